#!/usr/bin/env bash
# Put NVIDIA's NV-Generate-CTMR at the pinned commit into the git-ignored folder benchmarks/.reference/,
# for benchmarks/race_reference.py. NVIDIA's code is run from there and never vendored into ctfactory.
#
#   bash scripts/fetch_reference.sh [MIRROR]            # MIRROR: a local clone or bare mirror of the repository
#   bash scripts/fetch_reference.sh                     # else: git clone https://github.com/NVIDIA-Medtech/NV-Generate-CTMR
#   WHEELS=1 bash scripts/fetch_reference.sh [MIRROR]   # also download the wheels a bare GPU image lacks
#
# Only the parts the race runs or cites are exported (scripts/, configs/, docs/, LICENSE, requirements.txt,
# pyproject.toml, README.md), without a .git folder (git archive of the pinned commit): small enough to be carried
# to a GPU machine, and a mirror that lacks the large images and notebooks still works. The commit is written to
# PINNED_COMMIT inside the copy. An existing copy is
# replaced only when it is at another commit. With WHEELS=1 the wheels of monai, nibabel and isal (the packages
# the upstream script and ctfactory's engine need beyond a CUDA PyTorch image, and those of the other GPU
# benchmarks of benchmarks/gpu_issue16.sh; see benchmarks/RACE.md) are
# downloaded into benchmarks/.reference/wheels for CPython 3.12 on manylinux x86-64.
set -euo pipefail

PINNED_COMMIT="da438fe"
UPSTREAM_URL="https://github.com/NVIDIA-Medtech/NV-Generate-CTMR"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REF_ROOT="$ROOT/benchmarks/.reference"
DEST="$REF_ROOT/NV-Generate-CTMR"
SOURCE="${1:-}"

if ! git -C "$ROOT" check-ignore -q "benchmarks/.reference/x"; then
    echo "fetch_reference.sh expects benchmarks/.reference/ to be git-ignored, but got it tracked-able." \
         "Add 'benchmarks/.reference/' to .gitignore first." >&2
    exit 2
fi

if [[ -f "$DEST/PINNED_COMMIT" && "$(cat "$DEST/PINNED_COMMIT")" == "$PINNED_COMMIT"* ]]; then
    echo "reference already at $PINNED_COMMIT: $DEST"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    if [[ -n "$SOURCE" ]]; then
        if [[ ! -d "$SOURCE" ]]; then
            echo "fetch_reference.sh expects an existing local mirror directory, but got MIRROR=$SOURCE." \
                 "Pass the path of a clone or bare mirror, or no argument to clone $UPSTREAM_URL." >&2
            exit 2
        fi
        git_dir="$SOURCE"
    else
        git clone --quiet --no-checkout "$UPSTREAM_URL" "$tmp/clone"
        git_dir="$tmp/clone"
    fi
    full="$(git --git-dir="$git_dir" rev-parse --verify --quiet "${PINNED_COMMIT}^{commit}" 2>/dev/null \
            || git -C "$git_dir" rev-parse --verify --quiet "${PINNED_COMMIT}^{commit}" 2>/dev/null || true)"
    if [[ -z "$full" ]]; then
        echo "fetch_reference.sh expects the source to contain commit $PINNED_COMMIT, but got source=${SOURCE:-$UPSTREAM_URL}" \
             "without it. Update the mirror (git fetch) or clone from $UPSTREAM_URL." >&2
        exit 2
    fi
    mkdir -p "$tmp/tree"
    parts=(scripts configs docs LICENSE requirements.txt pyproject.toml README.md)
    if git --git-dir="$git_dir" cat-file -e "$full" 2>/dev/null; then
        git --git-dir="$git_dir" archive "$full" "${parts[@]}" | tar -x -C "$tmp/tree"
    else
        git -C "$git_dir" archive "$full" "${parts[@]}" | tar -x -C "$tmp/tree"
    fi
    echo "$full" > "$tmp/tree/PINNED_COMMIT"
    rm -rf "$DEST"
    mkdir -p "$REF_ROOT"
    mv "$tmp/tree" "$DEST"
    echo "reference at $full: $DEST"
fi

if [[ "${WHEELS:-0}" == "1" ]]; then
    PY="${PYTHON:-python3}"
    mkdir -p "$REF_ROOT/wheels"
    # versions: what ctfactory's CPU venv runs (pyproject pins). monai, nibabel (and isal, for fast gzip) for the
    # race; pydantic and its parts for the factory's case code (benchmarks/bench_batching.py); dask and distributed
    # with the parts the image lacks for benchmarks/bench_workers_gpu.py. The CUDA image has torch, numpy, scipy,
    # pyarrow, fsspec, safetensors, pyyaml, cloudpickle, msgpack, psutil, toolz, sortedcontainers and the rest.
    for req in "monai==1.6.1" "nibabel==5.4.2" "isal==1.9.1" "pydantic==2.14.4" "pydantic_core==2.50.5" \
               "annotated-types==0.8.0" "typing-inspection==0.4.5" "typing_extensions==4.16.0" \
               "dask==2026.8.0" "distributed==2026.8.0" "tornado==6.6.1" "zict==3.0.0" "tblib==3.2.2" \
               "partd==1.4.2" "locket==1.0.0"; do
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$REF_ROOT/wheels" "$req"
    done
    ls -l "$REF_ROOT/wheels"
fi
