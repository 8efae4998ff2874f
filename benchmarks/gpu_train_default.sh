#!/usr/bin/env bash
# One GPU session: train the embedded default model, then time the full MAISI architecture (benchmarks/gpu.py).
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_train_default.sh [TRAIN_MINUTES] [BENCH_SECONDS]
#
# A CPU smoke test of the whole script (seconds; arguments appended last win):
#   REQUIRE_CUDA=0 TRAIN_ARGS="--device cpu --phantom-cases 4 --corpus-workers 2 --steps-vae 2 --steps-unet 2
#   --steps-controlnet 2 --batch-vae 2 --batch-unet 2 --batch-controlnet 1"
#   BENCH_ARGS="--device cpu --preset tiny --sizes 32x32x32 --presets none --steps 2 --spacing 8 --spacing-z 8"
#   bash benchmarks/gpu_train_default.sh
#
# Training is `ctfactory models train` (flows.cli_models, the same code) with GPU-sized batches, whole 64^3
# volumes for the VAE and a 600-case phantom corpus drawn by 14 processes. It needs torch, monai, nibabel,
# numpy, scipy, safetensors and tqdm only (no Prefect, no catalog), so it also runs under a bare CUDA image.
# Results land in $OUT: the model directory as model.tar.gz.part-*, the loss log, the logs and the GPU rows.
set -uo pipefail
cd "$(dirname "$0")/.."   # the repository root: PYTHONPATH and benchmarks/gpu.py are relative to it
OUT="${OUT:-/tmp/gpu_out}"
TRAIN_MIN="${1:-5.5}"
BENCH_S="${2:-150}"
W="${W:-/tmp/train_default_gpu}"   # the model directory written (checkpoints in $W.checkpoints)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/env.log" || exit 3
import torch, monai, nibabel, maisi_core.training.pipeline
print("torch", torch.__version__, "monai", monai.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
import os
assert torch.cuda.is_available() or os.environ.get("REQUIRE_CUDA") == "0", "no CUDA device"
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/env.log" 2>&1

rm -rf "$W" "$W.checkpoints"
t0=$(date +%s)
# a file, not stdin: the corpus pool spawns processes that re-import the main module
cat > /tmp/train_default_launcher.py <<'PYEOF'
import argparse, sys
from flows import cli_models

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="ctfactory")
    cli_models.register(parser.add_subparsers(dest="command"))
    out, minutes, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    args = parser.parse_args([
        "models", "train", "--preset", "default", "--out", out, "--device", "cuda", "--seed", "0",
        "--phantom-cases", "600", "--corpus-workers", "14",
        "--steps-vae", "6000", "--steps-unet", "5000", "--steps-controlnet", "6000",
        "--batch-vae", "8", "--vae-patch-vox", "64", "--batch-unet", "16", "--batch-controlnet", "8",
        "--checkpoint-every", "1000", "--max-minutes", minutes, *extra,
    ])
    sys.exit(args.func(args))
PYEOF
"$PY" /tmp/train_default_launcher.py "$W" "$TRAIN_MIN" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log"
echo "train wall $(( $(date +%s) - t0 )) s" | tee -a "$OUT/train.log"
if [ -f "$W/model_index.json" ]; then
    cp "$W.checkpoints/loss_log.jsonl" "$OUT/" 2>/dev/null
    tar -C "$(dirname "$W")" -czf - "$(basename "$W")" | split -b 15m - "$OUT/model.tar.gz.part-"
fi

[ "$BENCH_S" -gt 0 ] && timeout "$BENCH_S" "$PY" benchmarks/gpu.py --sizes 256x256x128 512x512x512 --presets 80g 24g 32g \
    --precision fp16 ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.log"
echo "done $(( $(date +%s) - t0 )) s"
