#!/usr/bin/env bash
# Environment for the ModelZoo-style launch scripts beside this file, plus their shared runner.
# On an Ascend host it loads CANN and sets HCCL variables; elsewhere (GPU/CPU) it changes nothing
# that matters, and train.py picks the device itself.

CANN_ENV=${CANN_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
if [ -f "$CANN_ENV" ]; then
    # shellcheck disable=SC1090
    source "$CANN_ENV"
    export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
    export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}
    export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
    export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
else
    # torch_npu installed without CANN would break `import torch`: never auto-load it here
    export TORCH_DEVICE_BACKEND_AUTOLOAD=0
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# run_case NAME NPROC CONFIG [train.py flags...]
# Runs torchrun, logs to test/output/NAME/, then prints the ModelZoo summary and writes the
# `key = value` case log that ModelZoo tooling parses.
run_case() {
    local name=$1 nproc=$2 config=$3
    shift 3
    local here root out start end
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    root=$(dirname "$here")
    out="$here/output/$name"
    mkdir -p "$out"
    start=$(date +%s)
    (cd "$root" && python -m torch.distributed.run --nproc_per_node "$nproc" train.py \
        --config "$config" --workdir "$out/run" "$@") 2>&1 | tee "$out/train.log"
    local status=${PIPESTATUS[0]}
    end=$(date +%s)
    local fps acc loss batch
    fps=$(grep -o '| [0-9.]* img/s' "$out/train.log" | awk '{s+=$2; n++} END {if (n) printf "%.2f", s/n; else print "0"}')
    acc=$(grep -o 'zero-shot top-1 [0-9.]*' "$out/train.log" | tail -1 | awk '{print $3}')
    loss=$(grep -o 'total [0-9.e+-]*' "$out/train.log" | tail -1 | awk '{print $2}')
    batch=$(grep -o 'data.batch_size=[0-9]*' <<< "$*" | tail -1 | cut -d= -f2)
    echo "------------------ Final result ------------------"
    echo "Final Performance images/sec : ${fps}"
    echo "Final Train Accuracy : ${acc:-NA}"
    echo "E2E Training Duration sec : $((end - start))"
    {
        echo "Network = DeCLIP"
        echo "RankSize = ${nproc}"
        echo "BatchSize = ${batch:-128}"
        echo "DeviceType = $(uname -m)"
        echo "CaseName = ${name}"
        echo "ActualFPS = ${fps}"
        echo "TrainingTime = $(awk -v f="$fps" -v b="${batch:-128}" -v n="$nproc" 'BEGIN {if (f > 0) printf "%.4f", b * n / f; else print "0"}')"
        echo "ActualLoss = ${loss:-NA}"
        echo "TrainAccuracy = ${acc:-NA}"
        echo "E2ETrainingTime = $((end - start))"
    } > "$out/${name}_perf_report.log"
    cat "$out/${name}_perf_report.log"
    return "$status"
}

# data_flags DATA_PATH: train.py overrides for a YFCC15M-layout folder
# (DATA_PATH/yfcc15m_clean_open_data.json + images/, DATA_PATH/val_official.json + val/).
data_flags() {
    local d=$1
    echo "--config.data.train_meta=$d/yfcc15m_clean_open_data.json --config.data.train_root=$d/images" \
         "--config.data.val_meta=$d/val_official.json --config.data.val_root=$d/val"
}

# modelzoo_main NAME NPROC "FIXED FLAGS" "$@": parse --data_path=PATH, pass the rest to train.py.
modelzoo_main() {
    local name=$1 nproc=$2 fixed=$3
    shift 3
    local data_path="" extra=()
    for arg in "$@"; do
        case $arg in
            --data_path=*) data_path=${arg#*=} ;;
            *) extra+=("$arg") ;;
        esac
    done
    if [ -z "$data_path" ]; then
        echo "usage: bash test/$name.sh --data_path=PATH [train.py flags]" >&2
        return 2
    fi
    # shellcheck disable=SC2046,SC2086
    run_case "$name" "$nproc" configs/vitb32.py $(data_flags "$data_path") $fixed "${extra[@]}"
}
