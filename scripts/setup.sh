#!/usr/bin/env bash
# Create .venv and install ctfactory with its test tools (CPU torch by default).
# Usage: bash scripts/setup.sh            (idempotent; re-running only installs what changed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade "pip>=24" >/dev/null
# torch pinned in the same resolve as the project, so pip never swaps in a multi-GB CUDA build on a
# CPU machine (a lone "torch>=2.4" lets it pick the newest wheel it can find). On a GPU machine set
# CTFACTORY_TORCH to the build you want, e.g. CTFACTORY_TORCH="torch==2.13.0" from your CUDA index.
python -m pip install -q "${CTFACTORY_TORCH:-torch==2.13.0}" -e ".[test]"
echo "ctfactory installed in .venv ($(python -c 'import torch, monai; print("torch", torch.__version__, "monai", monai.__version__)'))"
