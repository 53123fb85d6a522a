"""DeCLIP ViT-B/32 on YFCC15M, the reference run (batch 128 per device, 128,001 steps).

Which number a launch reproduces: the published 43.2 % zero-shot ImageNet top-1 comes from 32
devices x 128 = a global batch of 4,096 (the ModelZoo table's 32p row, 2,000 FPS), ~34 passes
over YFCC15M. The 8-device launch below is a global batch of 1,024 (the table's 8p row: 580 FPS,
32.9 %), ~8.5 passes in the same 128,001 steps. `--config.accum_steps=4` on 8 devices makes each
step exactly one step of the 32-device job (batch 4,096), in over 4x its time per step.

    torchrun --nproc_per_node 8 train.py --config configs/vitb32.py --workdir runs/vitb32
    torchrun --nproc_per_node 8 train.py --config configs/vitb32.py --workdir runs/vitb32_4k --config.accum_steps=4
"""
from configs import common


def get_config(arg=None):
    return common.apply_arg(common.base_config(common.ViT_B32), arg)
