#!/usr/bin/env bash
# Check that the torch in a virtualenv is the flavor an image needs: `cpu` must be a CPU build (an
# unreachable CPU index makes pip fall back to PyPI's CUDA build: gigabytes the CPU image never uses),
# `gpu` must be a CUDA build. `any` (a host's `make setup`) checks nothing.
# usage: scripts/check_torch.sh cpu|gpu|any VENV
set -euo pipefail
flavor="$1" venv="$2"
[ "$flavor" = any ] && exit 0
read -r version cuda < <("$venv/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")')
size="$(du -sh "$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')" | cut -f1)"
if [ "$flavor" = cpu ] && [ "$cuda" != none ]; then
  echo "[setup] ERROR: torch $version is a CUDA $cuda build ($size), but the cpu flavor needs the CPU build:" \
    "is the CPU torch index (TORCH_INDEX_URL=${TORCH_INDEX_URL:-}) reachable, or a CPU wheel in PIP_FIND_LINKS?" >&2
  exit 1
fi
if [ "$flavor" = gpu ] && [ "$cuda" = none ]; then
  echo "[setup] ERROR: torch $version is a CPU build, but the gpu flavor needs a CUDA build" \
    "(TORCH_INDEX_URL=${TORCH_INDEX_URL:-} served a CPU wheel?)" >&2
  exit 1
fi
echo "[setup] torch $version ($flavor: CUDA $cuda, $size)"
