#!/usr/bin/env bash
# Reproduce the embedded default model (maisi_core/models/default): two `ctfactory models train` runs on one GPU.
# Usage: benchmarks/train_default_model.sh [WORKDIR]   (then copy WORKDIR/run2's vae/unet/controlnet and
# model_index.json into maisi_core/models/default; MODEL_CARD.md records what the shipped runs reached)
# About 10 minutes on an NVIDIA H200. --max-minutes caps each run's wall time, so another GPU stops at other
# steps; the steps reached are recorded in each model_index.json under "training".
# Needs torch with CUDA, monai, nibabel, scipy, safetensors, tqdm (no Prefect: it calls flows.cli_models).
set -euo pipefail
WORK="${1:-/tmp/train_default}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$WORK"
# run 1: all three stages from scratch, 6 minutes
W="$WORK/run1" OUT="$WORK/out1" bash "$HERE/gpu_train_default.sh" 6 0
# run 2: the VAE decoder only (encoder frozen: latents, UNet and ControlNet stay valid), 3.2 minutes
W="$WORK/run2" OUT="$WORK/out2" \
    TRAIN_ARGS="--from $WORK/run1 --stages vae --vae-decoder-only --steps-vae 3000 --vae-patch-vox 32 --batch-vae 16 --seed 1" \
    bash "$HERE/gpu_train_default.sh" 3.2 0
echo "model: $WORK/run2"
