#!/usr/bin/env bash
# The CUDA compiler and headers for building Horovod against a CUDA build of torch, from PyPI: the
# `cuda-toolkit[nvcc,cccl]` release that the installed torch itself requires (so nvcc's CUDA version is
# torch's), installed once into a folder of the wheel cache, never into the virtualenv (an image's runtime
# stage gets the virtualenv and no compiler). No system CUDA toolkit is needed.
#   usage: cuda_toolchain.sh VENV CACHE    prints the toolkit's home (bin/nvcc, include/, lib64/)
set -euo pipefail

VENV="${1:?usage: cuda_toolchain.sh VENV CACHE}"
CACHE="${2:?usage: cuda_toolchain.sh VENV CACHE}"
PY="$VENV/bin/python"

die() {
  printf '[horovod] ERROR: %s\n' "$*" >&2
  exit 1
}

# torch's own requirement, e.g. "cuda-toolkit[cublas,cudart,...]==13.0.3; platform_system == 'Linux'".
read_requirement='import re
from importlib.metadata import requires
for r in requires("torch") or []:
    m = re.match(r"cuda-toolkit\s*(\[[^\]]*\])?\s*==\s*([0-9.]+)", r)
    if m:
        print(m.group(2))
        break'
version="$("$PY" -c "$read_requirement")"
[ -n "$version" ] || die "this torch does not require cuda-toolkit from PyPI (a CUDA 12 or older build?);" \
  "set HOROVOD_CUDA_HOME to a CUDA toolkit matching torch.version.cuda"
major="${version%%.*}"
dest="$CACHE/cuda-toolkit-$version-$(uname -m)"
home="$dest/nvidia/cu$major"

if [ ! -x "$home/bin/nvcc" ] || [ ! -f "$dest/.complete" ]; then
  printf '[horovod] installing nvcc and CUDA headers %s from PyPI into %s\n' "$version" "$dest" >&2
  rm -rf "$dest"
  mkdir -p "$CACHE"
  "$PY" -m pip --disable-pip-version-check -q install --target "$dest" "cuda-toolkit[nvcc,cccl]==$version" >&2 \
    || die "could not install cuda-toolkit[nvcc,cccl]==$version from the package index"
  [ -x "$home/bin/nvcc" ] || die "cuda-toolkit[nvcc]==$version installed no $home/bin/nvcc"
  # The layout nvcc.profile and CMake's FindCUDAToolkit expect of a toolkit: lib64, targets/<arch>/, and
  # unversioned library names for the linker.
  case "$(uname -m)" in aarch64) target=sbsa-linux ;; *) target="$(uname -m)-linux" ;; esac
  ln -sfn lib "$home/lib64"
  mkdir -p "$home/targets/$target"
  ln -sfn ../../include "$home/targets/$target/include"
  ln -sfn ../../lib "$home/targets/$target/lib"
  ln -sfn libcudart.so."$major" "$home/lib/libcudart.so"
  touch "$dest/.complete"
fi
echo "$home"
