#!/usr/bin/env bash
# ModelZoo-style full run (the whole schedule, zero-shot top-1; case DeCLIP_for_PyTorch_bs128_1p_acc):
# DeCLIP ViT-B/32 (configs/vitb32.py), batch 128 per device, 1 device(s).
# Usage: bash modelzoo/train_full_1p.sh [--data_path=DIR] [--start_fresh] [train.py flags...]
#   (or by the port's name, bash test/train_full_1p.sh, with the same arguments)
# A relaunch resumes the run in test/output/${ASCEND_DEVICE_ID:-0}/; --start_fresh starts over.
# Data from ./dataset unless --data_path is given; outputs in test/output/${ASCEND_DEVICE_ID:-0}/,
# weights in ./checkpoint/ (layout and environment variables: modelzoo/env_npu.sh).
source "$(dirname "${BASH_SOURCE[0]}")/env_npu.sh"
modelzoo_main 1 acc "$@"
