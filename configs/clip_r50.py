"""CLIP baseline, ResNet-50 (embed 1024): the DeCLIP run's data and schedule, CLIP loss only.

    torchrun --nproc_per_node 8 train.py --config configs/clip_r50.py --workdir runs/clip_r50
"""
from configs import common


def get_config(arg=None):
    return common.apply_arg(common.base_config(common.R50, declip=False), arg)
