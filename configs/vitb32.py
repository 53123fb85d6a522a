"""DeCLIP ViT-B/32 on YFCC15M, the reference run (batch 128 per device, 128,001 steps).

    torchrun --nproc_per_node 8 train.py --config configs/vitb32.py --workdir runs/vitb32
"""
from configs import common


def get_config(arg=None):
    return common.apply_arg(common.base_config(common.ViT_B32), arg)
