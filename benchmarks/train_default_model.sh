#!/usr/bin/env bash
# Reproduce the embedded default model (maisi_core/models/default) on a CPU, as a chain of runs.
# Usage: benchmarks/train_default_model.sh [WORKDIR]   (then copy WORKDIR/model into maisi_core/models/default)
# --max-minutes caps each run's wall time, so a machine of another speed stops at other steps; the steps
# reached are recorded in each model_index.json under "training". --threads 1: see MODEL_CARD.md.
set -euo pipefail
W="${1:-/tmp/train_default}"
mkdir -p "$W"
common=(--phantom-cases 300 --device cpu --threads 1)
# run 1: all three stages from scratch
ctfactory models train --preset default --out "$W/stage1" "${common[@]}" --seed 0 --max-minutes 38 \
    --steps-vae 600 --steps-unet 1200 --steps-controlnet 1300
# runs 2-3: VAE decoder only (the encoder, hence the latents, UNet and ControlNet stay valid)
ctfactory models train --from "$W/stage1" --out "$W/dec1" "${common[@]}" --seed 0 --max-minutes 20 \
    --stages vae --vae-decoder-only --steps-vae 700
ctfactory models train --from "$W/dec1" --out "$W/dec2" "${common[@]}" --seed 1 --max-minutes 24 \
    --stages vae --vae-decoder-only --steps-vae 900
# run 4: ControlNet only, continued (VAE and UNet kept)
ctfactory models train --from "$W/dec2" --out "$W/model" "${common[@]}" --seed 2 --max-minutes 22 \
    --stages controlnet --steps-controlnet 1000
