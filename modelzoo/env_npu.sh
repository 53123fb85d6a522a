#!/usr/bin/env bash
# Environment and shared runner of the ModelZoo-style launch scripts beside this file (modelzoo/).
# test/ holds the names the Ascend ModelZoo port's README uses (test/train_full_8p.sh, ...,
# test/env_npu.sh), each only handing over to the script of the same name here.
#
# The scripts belong to the repository they sit in: they work in its root (the parent of modelzoo/)
# wherever they are started from, e.g. `bash test/train_full_8p.sh` or `bash modelzoo/train_full_8p.sh`
# in the root, or `bash train_full_8p.sh` in test/. Paths there:
#   dataset/ (or --data_path=DIR, relative to where the command runs):
#       yfcc15m_clean_open_data.json   training meta, JSON Lines (filename, caption)
#       yfcc15m_clean_open_data/       training images
#       bpe_simple_vocab_16e6.txt.gz   vocabulary (optional; else the one `python tools/prepare.py setup` fetched)
#       val_official.json              validation meta, JSON Lines (filename, label, label_name)
#       imagenet_val/                  ILSVRC2012_val_*.JPEG, one flat folder
#     The validation pair is required for full runs (their accuracy) and optional for performance runs.
#     `python tools/prepare.py modelzoo-dataset` lays the demo corpus out this way.
#   test/output/$ASCEND_DEVICE_ID/
#       train_$ASCEND_DEVICE_ID.log    the training log (a full run's relaunch appends to it)
#       $CaseName.log                  `key = value` summary (Network, RankSize, BatchSize, DeviceType,
#                                      CaseName, ActualFPS, TrainingTime, ActualLoss, [TrainAccuracy],
#                                      E2ETrainingTime)
#       train_${CaseName}_loss.txt     the total loss of every logged step, one a line
#       workdir/                       train.py's --workdir (checkpoints/, tb/)
#   checkpoint/$CaseName.pt          the run's checkpoints/last.pt, copied when training succeeded
# A full run's relaunch (after a crash, a preemption) resumes from workdir/checkpoints: the folder
# is kept unless --start_fresh is given, which empties it and trains from step 0. Performance runs
# (at most 1,000 steps from step 0, a speed measurement) always start with an empty folder.
# Network is DeCLIP_for_PyTorch (the port's name); CaseName is
# DeCLIP_for_PyTorch_bs<batch per device>_<devices>p_perf (performance scripts) or ..._acc (full).
# ActualFPS averages train.py's img/s (all devices) over the log windows after the first of each
# launch; TrainingTime is milliseconds per step (batch per device * devices * 1000 / ActualFPS).
#
# Environment: ASCEND_DEVICE_ID (default 0) names the output folder and, when set, the card of a
# 1-device run (as ASCEND_RT_VISIBLE_DEVICES, however CANN was set up). DECLIP_CONFIG (default
# configs/vitb32.py) is train.py's config, e.g. configs/vitb32.py:smoke. CANN: CANN_ENV=/path/to/
# set_env.sh; else an environment that already has it (ASCEND_HOME_PATH or ASCEND_TOOLKIT_HOME
# set); else the Install_Path of /etc/Ascend/ascend_cann_install.info or
# $HOME/Ascend/ascend_cann_install.info, /usr/local/Ascend, $HOME/Ascend, each with cann/set_env.sh
# (CANN >= 8.5), ascend-toolkit/set_env.sh or nnae/set_env.sh. Without CANN, torch_npu is not
# auto-loaded (TORCH_DEVICE_BACKEND_AUTOLOAD=0) and train.py picks the GPU or CPU itself
# (CUDA_VISIBLE_DEVICES is left as it is).
# Every argument but --data_path=DIR and --start_fresh goes to train.py after the script's own
# flags, so it wins; train.py runs in the repository root. A missing dataset item stops the script (status 2, naming
# it) before anything is written; otherwise the exit status is the training's (torchrun's: 0 when
# every process exited 0), or 1 when the weights could not be copied.

# cann_env_script INFO_FILE...: the first set_env.sh of CANN found under the Install_Path of the
# install records given, /usr/local/Ascend or $HOME/Ascend (nothing if there is none).
cann_env_script() {
    local info roots=() root name
    for info in "$@"; do
        [ -f "$info" ] && roots+=("$(grep -m1 '^Install_Path=' "$info" | cut -d= -f2-)")
    done
    roots+=(/usr/local/Ascend "${HOME:-/nonexistent}/Ascend")
    for root in "${roots[@]}"; do
        for name in cann ascend-toolkit nnae; do
            if [ -n "$root" ] && [ -f "$root/$name/set_env.sh" ]; then
                echo "$root/$name/set_env.sh"
                return
            fi
        done
    done
}

ON_ASCEND=0
CANN_ENV=${CANN_ENV:-}
if [ -z "$CANN_ENV" ] && [ -z "${ASCEND_HOME_PATH:-}${ASCEND_TOOLKIT_HOME:-}" ]; then
    CANN_ENV=$(cann_env_script /etc/Ascend/ascend_cann_install.info "${HOME:-/nonexistent}/Ascend/ascend_cann_install.info")
fi
if [ -n "$CANN_ENV" ] && [ -f "$CANN_ENV" ]; then
    # shellcheck disable=SC1090
    source "$CANN_ENV"
    ON_ASCEND=1
elif [ -n "${ASCEND_HOME_PATH:-}${ASCEND_TOOLKIT_HOME:-}" ]; then
    ON_ASCEND=1   # CANN's environment is already set (a container, a login script)
fi
if [ "$ON_ASCEND" = 1 ]; then
    export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
    export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}
    export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
    export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
    export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
else
    # torch_npu installed without CANN would break `import torch`: never auto-load it here
    export TORCH_DEVICE_BACKEND_AUTOLOAD=0
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# check_dataset DIR NEED_VAL: names what is missing from DIR on stderr; non-zero if anything is.
check_dataset() {
    local dir=$1 need_val=$2 missing=() item
    if [ ! -d "$dir" ]; then
        echo "error: dataset folder not found: $dir (put the data in ./dataset or pass --data_path=DIR;" \
             "\`python tools/prepare.py modelzoo-dataset\` lays out the demo corpus there)" >&2
        return 1
    fi
    [ -f "$dir/yfcc15m_clean_open_data.json" ] || missing+=(yfcc15m_clean_open_data.json)
    [ -d "$dir/yfcc15m_clean_open_data" ] || missing+=(yfcc15m_clean_open_data/)
    if [ "$need_val" = 1 ] || [ -e "$dir/val_official.json" ] || [ -e "$dir/imagenet_val" ]; then
        [ -f "$dir/val_official.json" ] || missing+=(val_official.json)
        [ -d "$dir/imagenet_val" ] || missing+=(imagenet_val/)
    fi
    for item in "${missing[@]}"; do
        echo "error: dataset folder $dir has no $item" >&2
    done
    [ ${#missing[@]} -eq 0 ]
}

# data_flags DIR: train.py overrides for a dataset folder in the layout above (DIR checked already).
data_flags() {
    local d=$1
    echo "--config.data.train_meta=$d/yfcc15m_clean_open_data.json"
    echo "--config.data.train_root=$d/yfcc15m_clean_open_data"
    if [ -f "$d/val_official.json" ]; then
        echo "--config.data.val_meta=$d/val_official.json"
        echo "--config.data.val_root=$d/imagenet_val"
    fi
    if [ -f "$d/bpe_simple_vocab_16e6.txt.gz" ]; then
        echo "--config.data.bpe_path=$d/bpe_simple_vocab_16e6.txt.gz"
    fi
}

# config_batch CONFIG [train.py flags...]: the batch per device the run will use ("NA" if the
# config does not load: train.py then says why).
config_batch() {
    python - "$@" 2>/dev/null <<'EOF' || echo NA
import sys
from absl import flags
from ml_collections import config_flags
config = config_flags.DEFINE_config_file('config', lock_config=True)
flags.FLAGS(['config_batch', f'--config={sys.argv[1]}', *sys.argv[2:]], known_only=True)
print(config.value.data.batch_size)
EOF
}

# report LOG CASE OUT NPROC BATCH SECONDS WITH_ACC: the ModelZoo summary of a training log.
report() {
    local log=$1 case_name=$2 out=$3 nproc=$4 batch=$5 seconds=$6 with_acc=$7 fps step_ms loss acc
    awk '/ img\/s \|/ {for (i = 1; i < NF; i++) if ($i == "total") {print $(i + 1); break}}' "$log" \
        > "$out/train_${case_name}_loss.txt"
    # the first window of each launch (train.py's `device ... | backend` line starts one) holds
    # start-up (compilation, loader warm-up): averaged only when no other window is there
    fps=$(awk 'BEGIN {first = 1} /^device .* \| backend / {first = 1}
        match($0, /\| [0-9.]+ img\/s/) {n++; v[n] = substr($0, RSTART + 2, RLENGTH - 8) + 0; skip[n] = first; first = 0}
        END {for (i = 1; i <= n; i++) if (!skip[i]) {s += v[i]; k++}
             if (!k) for (i = 1; i <= n; i++) {s += v[i]; k++}
             if (k) printf "%.2f", s / k; else print 0}' "$log")
    step_ms=$(awk -v f="$fps" -v b="$batch" -v n="$nproc" 'BEGIN {
        if (f > 0 && b ~ /^[0-9]+$/) printf "%.2f", b * n * 1000 / f; else print "NA"}')
    loss=$(tail -n 1 "$out/train_${case_name}_loss.txt")
    acc=$(grep -o 'zero-shot top-1 [0-9.]*' "$log" | tail -n 1 | awk '{print $3}')
    echo "------------------ Final result ------------------"
    echo "Final Performance images/sec : $fps"
    [ "$with_acc" = 1 ] && echo "Final Train Accuracy : ${acc:-NA}"
    echo "E2E Training Duration sec : $seconds"
    {
        echo "Network = $NETWORK"
        echo "RankSize = $nproc"
        echo "BatchSize = $batch"
        echo "DeviceType = $(uname -m)"
        echo "CaseName = $case_name"
        echo "ActualFPS = $fps"
        echo "TrainingTime = $step_ms"
        echo "ActualLoss = ${loss:-NA}"
        [ "$with_acc" = 1 ] && echo "TrainAccuracy = ${acc:-NA}"
        echo "E2ETrainingTime = $seconds"
    } > "$out/$case_name.log"
}

NETWORK=DeCLIP_for_PyTorch

# modelzoo_main NPROC perf|acc [--data_path=DIR] [--start_fresh] [train.py flags...]
modelzoo_main() {
    local nproc=$1 kind=$2
    shift 2
    local root data_path="" extra=() arg device_id=${ASCEND_DEVICE_ID:-0} fresh=0
    local config=${DECLIP_CONFIG:-configs/vitb32.py} fixed=() start
    start=$(date +%s)
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    for arg in "$@"; do
        case $arg in
            --data_path=*) data_path=${arg#*=} ;;
            --start_fresh) fresh=1 ;;
            *) extra+=("$arg") ;;
        esac
    done
    data_path=${data_path:-$root/dataset}
    case $data_path in /*) ;; *) data_path=$PWD/$data_path ;; esac
    [ -d "$data_path" ] && data_path=$(cd "$data_path" && pwd)
    if ! [[ $device_id =~ ^[0-9]+$ ]]; then
        echo "error: ASCEND_DEVICE_ID must be a card number, got '$device_id'" >&2
        return 2
    fi
    check_dataset "$data_path" "$([ "$kind" = acc ] && echo 1 || echo 0)" || return 2
    cd "$root" || return 2
    [ "$kind" = perf ] && fixed=(--config.stop_at=1000) && fresh=1
    # a 1-device run uses card ASCEND_DEVICE_ID when it is named (whoever set up CANN; other
    # accelerators ignore the variable), on an Ascend host else the first visible one
    if [ "$nproc" = 1 ]; then
        if [ -n "${ASCEND_DEVICE_ID:-}" ] || { [ "$ON_ASCEND" = 1 ] && [ -z "${ASCEND_RT_VISIBLE_DEVICES:-}" ]; }; then
            export ASCEND_RT_VISIBLE_DEVICES=$device_id
        fi
    fi
    local flags=() batch case_name out="$root/test/output/$device_id" status
    mapfile -t flags < <(data_flags "$data_path")
    flags+=("${fixed[@]}" "${extra[@]}")
    batch=$(config_batch "$config" "${flags[@]}")
    case_name="${NETWORK}_bs${batch}_${nproc}p_${kind}"
    [ "$fresh" = 1 ] && rm -rf "$out"   # else a relaunch resumes from $out/workdir/checkpoints
    mkdir -p "$out"
    python -m torch.distributed.run --standalone --nproc_per_node "$nproc" train.py \
        --config "$config" --workdir "$out/workdir" "${flags[@]}" 2>&1 | tee -a "$out/train_$device_id.log"
    status=${PIPESTATUS[0]}
    report "$out/train_$device_id.log" "$case_name" "$out" "$nproc" "$batch" $(($(date +%s) - start)) \
        "$([ "$kind" = acc ] && echo 1 || echo 0)"
    if [ "$status" = 0 ]; then
        mkdir -p checkpoint && cp "$out/workdir/checkpoints/last.pt" "checkpoint/$case_name.pt" || return 1
        echo "weights: $root/checkpoint/$case_name.pt"
    fi
    return "$status"
}
