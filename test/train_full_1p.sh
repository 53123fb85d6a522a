#!/usr/bin/env bash
# The Ascend ModelZoo port's name for modelzoo/train_full_1p.sh (bash test/train_full_1p.sh in the repository
# root, bash train_full_1p.sh in test/): runs that script with the same arguments.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../modelzoo/train_full_1p.sh" "$@"
