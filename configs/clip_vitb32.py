"""CLIP baseline, ViT-B/32: the DeCLIP run's data and schedule, one view, the plain caption, CLIP loss only.

    torchrun --nproc_per_node 8 train.py --config configs/clip_vitb32.py --workdir runs/clip_vitb32
"""
from configs import common


def get_config(arg=None):
    return common.apply_arg(common.base_config(common.ViT_B32, declip=False), arg)
