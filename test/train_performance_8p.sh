#!/usr/bin/env bash
# ModelZoo-style performance run on 8 device(s): DeCLIP ViT-B/32, batch 128 per device, 1,000 steps.
# Usage: bash test/train_performance_8p.sh --data_path=/path/to/yfcc15m [train.py flags...]
source "$(dirname "$0")/env_npu.sh"
modelzoo_main train_performance_8p 8 --config.stop_at=1000 "$@"
