"""DeCLIP ResNet-50 (embed 1024) on YFCC15M, the reference run (batch 128 per device, 128,001 steps).

    torchrun --nproc_per_node 8 train.py --config configs/r50.py --workdir runs/r50
"""
from configs import common


def get_config(arg=None):
    return common.apply_arg(common.base_config(common.R50), arg)
