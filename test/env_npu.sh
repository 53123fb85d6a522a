#!/usr/bin/env bash
# The Ascend ModelZoo port's name for modelzoo/env_npu.sh: `source test/env_npu.sh` loads CANN and the
# HCCL settings from there (documented there).
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/../modelzoo/env_npu.sh"
