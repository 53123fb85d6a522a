r"""CLIP baseline, ResNet-50 (embed 1024): the DeCLIP run's data and schedule, CLIP loss only.

Which number a launch reproduces: the published CLIP baseline, 37.2 % zero-shot ImageNet top-1,
comes from 32 devices x 128 = a global batch of 4,096 (as the ModelZoo table's 32p row), ~34
passes over YFCC15M. The 8-device launch below is a global batch of 1,024, ~8.5 passes in the
same 128,001 steps, for which no number is published. `--config.accum_steps=4` on 8 devices
makes each step exactly one step of the 32-device job (batch 4,096). BatchNorm per device, as the
reference's CLIP-R50 config (`use_sync_bn: False`; only DeCLIP-R50 asks for synchronised BN).
Crops as the reference's CLIP experiments (STANDARD_SLIP): RandomResizedCrop(scale 0.5-1) only, no
flip, no colour op (data.augmentation='standard_slip').

    torchrun --nproc_per_node 8 train.py --config configs/clip_r50.py --workdir runs/clip_r50
    torchrun --nproc_per_node 8 train.py --config configs/clip_r50.py --workdir runs/clip_r50_4k \
        --config.accum_steps=4
"""
from configs import common


def get_config(arg=None):
    c = common.base_config(common.R50, declip=False)
    c.model.sync_bn = False   # the reference's CLIP-R50 config: use_sync_bn False (per-device BatchNorm)
    return common.apply_arg(c, arg)
