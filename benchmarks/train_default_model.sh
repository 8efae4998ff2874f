#!/usr/bin/env bash
# Reproduce the embedded default model (maisi_core/models/default) on a CPU.
# Usage: benchmarks/train_default_model.sh [WORKDIR]   (then copy WORKDIR/model into maisi_core/models/default)
set -euo pipefail
WORK="${1:-/tmp/train_default}"
mkdir -p "$WORK"
ctfactory models train --preset default --out "$WORK/model" \
    --steps-vae 600 --steps-unet 1200 --steps-controlnet 1300 \
    --phantom-cases 300 --max-minutes 38 --device cpu --seed 0 --threads 1
