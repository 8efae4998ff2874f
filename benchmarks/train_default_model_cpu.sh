#!/usr/bin/env bash
# Re-make the embedded default model (maisi_core/models/default, v3) on the CPU: fine-tune all three networks
# of v2 on correctly oriented (RAS+) phantoms, with tumour voxels weighted so that tumours render.
#
#   bash benchmarks/train_default_model_cpu.sh [WORKDIR]     (about 60 minutes on one core of a 2-core box:
#   corpus 1 min, VAE 27 min, UNet 5 min, ControlNet 25 min)
#
# Then copy WORKDIR/model's vae/ unet/ controlnet/ and model_index.json into maisi_core/models/default and
# measure it with benchmarks/eval_default_model.py. v2 was trained on mirrored phantoms (issue 10): the
# fine-tune starts from it (the features carry over) and corrects the handedness. Tumour voxels weigh 30x
# and thin structures (ribs, spinal cord, trachea, airway) 10x in every stage's loss: without that, the x4
# VAE painted lung tumours as lung, the cord as bone and ribs as lung. TRAIN_EXTRA adds arguments.
set -euo pipefail
WORK="${1:-/tmp/train_default_cpu}"
cd "$(dirname "$0")/.."
CTF="${CTFACTORY:-.venv/bin/ctfactory}"
rm -rf "$WORK/model" "$WORK/model.checkpoints"
mkdir -p "$WORK"
OMP_NUM_THREADS=1 "$CTF" models train --from default --out "$WORK/model" --device cpu --threads 1 --seed 3 \
    --phantom-cases 300 --tumor-probability 0.6 --tumor-loss-weight 30 --thin-loss-weight 10 \
    --steps-vae 1000 --steps-unet 1500 --steps-controlnet 2200 \
    --lr-vae 5e-4 --lr-unet 2e-4 --lr-controlnet 2e-4 --checkpoint-every 200 ${TRAIN_EXTRA:-}
echo "model: $WORK/model"
