#!/usr/bin/env bash
# Every GPU figure the docs ask for, in two stages that each fit in a few minutes of one GPU:
#
#   scripts/gpu_report.sh bench OUT_DIR DATA_DIR   # GPU tests; ours vs transformers (B0/B2, fp32/bf16, 512x512,
#                                                  # batch 1 and 32, training step); eager vs compiled; loader vs step
#   scripts/gpu_report.sh train OUT_DIR DATA_DIR   # the camvid-b0-scratch recipe trained on the GPU (issue #15 item 6)
#
# DATA_DIR is CamVid in the recipe's layout ({train,val}/{images,labels}, e.g. ../shared/data/camvid). Every log
# and JSON goes to OUT_DIR (at most 8 files a stage). Run from the repository root with a Python that has torch,
# transformers, accelerate, datasets and evaluate; the package is used from the checkout (PYTHONPATH), so nothing
# is installed. Why a script: a lent GPU comes for minutes at a time, and the figures are only comparable when
# they come from one run on one card (docs/performance.md, docs/time_to_accuracy.md).
set -uo pipefail

stage=${1:?usage: scripts/gpu_report.sh bench|train OUT_DIR DATA_DIR}
out=${2:?usage: scripts/gpu_report.sh bench|train OUT_DIR DATA_DIR}
data=${3:?usage: scripts/gpu_report.sh bench|train OUT_DIR DATA_DIR}
[[ $stage == bench || $stage == train ]] || { echo "error: unknown stage $stage (bench or train)" >&2; exit 2; }
[[ -d "$data/train/images" && -d "$data/val/labels" ]] || { echo "error: $data is not CamVid's {train,val}/{images,labels}" >&2; exit 2; }
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
python=${PYTHON:-python3}
failed=0
run() { run_logging "" "$@"; }        # run NAME COMMAND...: the command's output in OUT_DIR/NAME.log, its exit status remembered
run_more() { run_logging -a "$@"; }  # the same, appended to a log an earlier run started
run_logging() {
    local tee_option=$1 name=$2
    shift 2
    echo "=== $name: $*" | tee $tee_option "$out/$name.log"
    local started=$SECONDS
    "$@" >>"$out/$name.log" 2>&1
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - started)) s" | tee -a "$out/$name.log"
    ((status == 0)) || failed=1
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$python" -c "import torch, transformers, accelerate, datasets, evaluate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU'); print('transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'evaluate', evaluate.__version__)"
} 2>&1 | tee "$out/environment.log"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "error: no GPU visible to torch" >&2; exit 2; }

case "$stage" in
bench)
    # The tests that need a GPU (on a CPU they are skipped): the CUDA benchmark options, the metric on the GPU.
    run tests "$python" -m pytest -q -p no:cacheprovider tests/test_benchmark.py tests/test_metrics.py -k cuda
    # Goal 1: ours / transformers, fp32 and bf16, B0 and B2 at 512x512, batch 1 and 32, training step batch 8.
    for dtype in fp32 bf16; do
        run "bench_$dtype" "$python" scripts/benchmark.py --device cuda --dtype "$dtype" --channels_last \
            --variants b0 b2 --size 512 --latency_batch 1 --throughput_batch 32 --train_batch 8 --json "$out/bench_$dtype.json"
    done
    # Goal 2: compiled / eager on the GPU, static sizes, in float32 and under bf16 autocast (both tables in one
    # log: no JSON, to stay at 8 files).
    run bench_compile "$python" scripts/benchmark.py --device cuda --variants b0 --size 512 --compile --dynamic false \
        --latency_batch 1 --train_batch 8 --repeats 5
    run_more bench_compile "$python" scripts/benchmark.py --device cuda --variants b0 --size 512 --compile --dynamic false \
        --latency_batch 1 --train_batch 8 --repeats 5 --dtype bf16
    # Goal 3: the loader's samples/s against the training step at batch 16, crop 512, 4 workers, both paths.
    run data "$python" scripts/benchmark_data.py --device cuda --config camvid-b0 --data_dir "$data" --crop 512 \
        --batch_size 16 --workers 4 --batches 6 --model_steps 3
    ;;
train)
    # Issue #15 item 6: the CPU recipe as it is, on the GPU (bf16, more loader workers); mean IoU and time.
    # A fresh output folder: train.py refuses one that an earlier run left files in.
    run_dir=$(mktemp -d)
    run train accelerate launch --num_processes 1 scripts/train.py --config camvid-b0-scratch --data_dir "$data" \
        --report_to none --dataloader_num_workers 8 --output_dir "$run_dir"
    cp "$run_dir/all_results.json" "$run_dir/train_log.jsonl" "$out/" || failed=1
    ;;
esac
exit $failed
