r"""DeCLIP ResNet-50 (embed 1024) on YFCC15M, the reference run (batch 128 per device, 128,001 steps).

Which number a launch reproduces: the published 44.4 % zero-shot ImageNet top-1 comes from 32
devices x 128 = a global batch of 4,096 (as the ModelZoo table's 32p row), ~34 passes over
YFCC15M. The 8-device launch below is a global batch of 1,024, ~8.5 passes in the same 128,001
steps: no R50 number is published for it (for ViT-B/32 that row gives 32.9 % against 43.2 %).
`--config.accum_steps=4 --config.model.sync_bn=False` on 8 devices makes each step exactly one
step of the 32-device job (batch 4,096) with per-device BatchNorm statistics, which is what the
reference's public code ran (accumulation cannot synchronise BatchNorm across micro-batches).

    torchrun --nproc_per_node 8 train.py --config configs/r50.py --workdir runs/r50
    torchrun --nproc_per_node 8 train.py --config configs/r50.py --workdir runs/r50_4k \
        --config.accum_steps=4 --config.model.sync_bn=False
"""
from configs import common


def get_config(arg=None):
    return common.apply_arg(common.base_config(common.R50), arg)
