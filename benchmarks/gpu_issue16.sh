#!/usr/bin/env bash
# The GPU measurements of issue 16 as short prepared runs for a lent GPU machine (one H200; no internet there).
#
# Here, before the device call (once per checkout):
#   WHEELS=1 bash scripts/fetch_reference.sh [MIRROR]   # NV-Generate-CTMR + the wheels the CUDA image lacks (~12 MB)
# Then one device call per part, each well inside the 10-minute limit, with carry: ["benchmarks/.reference"]:
#   bash benchmarks/gpu_issue16.sh batching   # item 1: cases/hour at 256x256x128 and 512x512x128, batch 1 vs auto,
#                                             # and auto with QC/writes overlapping generation (~5-6 min)
#   bash benchmarks/gpu_issue16.sh workers    # item 3: 1 vs 2 Dask workers sharing the GPU, 256x256x128 (~2 min)
#   bash benchmarks/gpu_issue16.sh race       # item 2: ctfactory vs upstream's script at 512^3, fp16 (~4-5 min)
#   bash benchmarks/gpu_issue16.sh all        # the three in this order (only if the budget allows ~10 min;
#                                             # then only 8 of the files under $OUT come back)
# The durations are estimates from the A100 figures of upstream's docs/performance.md and the 20.4 s that one
# 512^3 case took on an H200 before: nothing here has run on a GPU yet. Results (JSON and logs) go to $OUT.
# A CPU smoke run of the same steps (small sizes, tiny model; PYTHON: an interpreter with ctfactory installed):
#   DEVICE=cpu MODEL=preset:tiny SIZES=32x32x32 SPACING=8 CASES=2 STEPS=1 PYTHON=.venv/bin/python \
#     bash benchmarks/gpu_issue16.sh batching
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    batching | workers | race | all) ;;
    *) echo "gpu_issue16.sh expects one of batching, workers, race, all, but got '${1:-}'." >&2; exit 2 ;;
esac
OUT="${OUT:-/tmp/gpu16}"
mkdir -p "$OUT"
WHEELS=benchmarks/.reference/wheels
PY="${PYTHON:-python3}"
if [[ -d "$WHEELS" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 3
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
DEVICE="${DEVICE:-cuda}"
MODEL="${MODEL:-preset:maisi_ct_rflow}"
SIZES="${SIZES:-256x256x128 512x512x128}"
SPACING="${SPACING:-1.0}"
CASES="${CASES:-8}"
STEPS="${STEPS:-30}"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
else
    echo "no nvidia-smi on this machine" | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"

status=0
run_part() {
    local part="$1"
    shift
    echo "== $part: $*"
    local t0=$SECONDS
    "$PY" "$@" 2>&1 | tee "$OUT/$part.log"
    local rc=${PIPESTATUS[0]}
    echo "== $part: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$part.log"
    [[ $rc == 0 ]] || status=1
}

batching() {
    # shellcheck disable=SC2086  # SIZES is a list
    run_part batching benchmarks/bench_batching.py --model "$MODEL" --sizes $SIZES --spacing "$SPACING" \
        --cases "$CASES" --batches 1:off auto:off auto:on --steps "$STEPS" --device "$DEVICE" --json "$OUT/batching.json"
}
workers() {
    run_part workers benchmarks/bench_workers_gpu.py --model "$MODEL" --size "${SIZES%% *}" --spacing "$SPACING" \
        --cases "$CASES" --workers 1 2 --steps "$STEPS" --device "$DEVICE" --json "$OUT/workers.json"
}
race() {
    run_part race benchmarks/race_reference.py --size 512x512x512 --out /tmp/race
    cp /tmp/race/race.jsonl /tmp/race/plan.json "$OUT"/ 2>/dev/null
    for f in /tmp/race/log_*.txt /tmp/race/result_*.json; do [[ -f "$f" ]] && cp "$f" "$OUT"/; done
}

case "${1:-}" in
    batching) batching ;;
    workers) workers ;;
    race) race ;;
    all) batching; workers; race ;;
esac
exit $status
