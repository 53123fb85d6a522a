#!/usr/bin/env bash
# ModelZoo-style performance run (at most 1,000 steps; case DeCLIP_for_PyTorch_bs128_1p_perf):
# DeCLIP ViT-B/32 (configs/vitb32.py), batch 128 per device, 1 device(s).
# Usage: bash modelzoo/train_performance_1p.sh [--data_path=DIR] [train.py flags...]
#   (or by the port's name, bash test/train_performance_1p.sh, with the same arguments)
# Every launch starts from step 0 in an emptied test/output/${ASCEND_DEVICE_ID:-0}/.
# Data from ./dataset unless --data_path is given; outputs in test/output/${ASCEND_DEVICE_ID:-0}/,
# weights in ./checkpoint/ (layout and environment variables: modelzoo/env_npu.sh).
source "$(dirname "${BASH_SOURCE[0]}")/env_npu.sh"
modelzoo_main 1 perf "$@"
