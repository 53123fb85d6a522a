#!/usr/bin/env bash
# ModelZoo-style full run on 8 device(s): DeCLIP ViT-B/32, batch 128 per device, the full 128,001-step schedule.
# Usage: bash test/train_full_8p.sh --data_path=/path/to/yfcc15m [train.py flags...]
source "$(dirname "$0")/env_npu.sh"
modelzoo_main train_full_8p 8 "" "$@"
