#!/usr/bin/env bash
# Idempotent set-up: system packages, a virtualenv at $VENV (default .venv), torch, the harness, and the
# patched Horovod wheel (built once, then cached). Shared by `make setup` and the Dockerfile.
# Knobs (defaults are what `make setup` does; the Dockerfile sets the others):
#   HARNESS_INSTALL     editable (default: the harness with its test tools, and the Debian packages only the
#                       tests use) | run (the harness alone: what `make demo` needs) | none (all but the
#                       harness: torch, Horovod, its dependencies; the image installs the harness as a wheel)
#   TORCH_INDEX_URL     an extra package index for torch (e.g. https://download.pytorch.org/whl/cpu)
#   EXTRA_APT_PACKAGES  more Debian packages to install in step 1 (space-separated)
#   HARNESS_CHECK_BUILD what `horovodrun --check-build` must list (default: PyTorch MPI Gloo, and NCCL with a
#                       CUDA build of torch)
#   HARNESS_WITHOUT_HOROVOD=1  no Horovod (no build, no Open MPI, no compiler, no mpi4py): the torch backend
#                       only (`harness launch --backend torch`, torchrun); minutes less on a first set-up
# With a CUDA build of torch (a GPU machine's `make setup`, the GPU image), Horovod is compiled with NCCL by
# PyPI's nvcc (scripts/cuda_toolchain.sh): no system CUDA toolkit needed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
HARNESS_INSTALL="${HARNESS_INSTALL:-editable}"
read -ra CHECK_BUILD <<< "${HARNESS_CHECK_BUILD:-PyTorch MPI Gloo}"
read -ra EXTRA_APT <<< "${EXTRA_APT_PACKAGES:-}"
STAMP="$VENV/.harness-setup-stamp"
WITHOUT_HOROVOD="${HARNESS_WITHOUT_HOROVOD:-0}"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
case "$HARNESS_INSTALL" in editable|run|none) ;; *) die "HARNESS_INSTALL=$HARNESS_INSTALL: editable, run or none" ;; esac
case "$WITHOUT_HOROVOD" in 0|1) ;; *) die "HARNESS_WITHOUT_HOROVOD=$WITHOUT_HOROVOD: 1 or 0" ;; esac

# 1. System packages (Debian). Skipped when all are present, so a second run needs no network.
APT_PKGS=(openmpi-bin libopenmpi-dev build-essential cmake python3-venv "${EXTRA_APT[@]}")
# Open MPI, the compiler and CMake are Horovod's (its build, mpi4py, mpirun): the torch backend needs none.
[ "$WITHOUT_HOROVOD" = 0 ] || APT_PKGS=(python3-venv "${EXTRA_APT[@]}")
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing system packages: ${missing[*]} (and no apt-get to install them)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# What only the tests use, not the image: a PostgreSQL server (harness search --storage) and the two-host
# test bed's sshd and ip (tests/multihost). Optional: without them those tests are skipped with the reason.
TEST_PKGS=(postgresql openssh-server iproute2)
missing=()
for p in "${TEST_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "$HARNESS_INSTALL" = editable ] && [ "${#missing[@]}" -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "installing ${missing[*]} (for the tests)"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
    || log "warning: ${missing[*]} could not be installed; the tests that need them will be skipped"
fi

# 2. Virtualenv and Python packages.
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

req_hash="$(cat "$ROOT/pyproject.toml" "$HERE/setup.sh" "$HERE/build_horovod.sh" "$HERE"/horovod-patches/* 2>/dev/null | sha256sum | cut -c1-16)"
want="torch=$TORCH_VERSION install=$HARNESS_INSTALL req=$req_hash"
imports="import horovod.torch"
if [ "$WITHOUT_HOROVOD" = 1 ]; then want+=" horovod=no"; imports="import torch"; fi
[ "$HARNESS_INSTALL" = none ] || imports+=", harness"
have="$(cat "$STAMP" 2>/dev/null || true)"
[ "$HARNESS_INSTALL" != run ] || [ "$have" != "${want/install=run/install=editable}" ] || want="$have"  # a superset
if [ "$have" = "$want" ] && "$VENV/bin/python" -c "$imports" 2>/dev/null; then
  log "up to date ($VENV)"
  exit 0
fi

log "installing torch==$TORCH_VERSION and dependencies"
torch_index=(); [ -z "${TORCH_INDEX_URL:-}" ] || torch_index=(--extra-index-url "$TORCH_INDEX_URL")
torch_spec="torch==$TORCH_VERSION"
# The GPU image: never a CPU wheel that a local folder (PIP_FIND_LINKS) offers under the same version.
[ "${HARNESS_TORCH_FLAVOR:-any}" != gpu ] || torch_spec+=",!=$TORCH_VERSION+cpu"
"${PIP[@]}" install "${torch_index[@]}" "$torch_spec" numpy  # numpy with it: torch warns on import without
"$HERE/check_torch.sh" "${HARNESS_TORCH_FLAVOR:-any}" "$VENV"  # the image's flavor (Dockerfile)
# A CUDA build of torch gets Horovod with NCCL (scripts/build_horovod.sh): check that it has it.
if [ -n "$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")')" ]; then
  [[ " ${CHECK_BUILD[*]} " == *" NCCL "* ]] || CHECK_BUILD+=(NCCL)
fi
mpi=(mpi4py); [ "$WITHOUT_HOROVOD" = 0 ] || mpi=()
"${PIP[@]}" install pyyaml "${mpi[@]}" scikit-learn cloudpickle psutil packaging cffi

# 3. Horovod: patched, built once per (horovod, torch, python, flavor), cached.
if [ "$WITHOUT_HOROVOD" = 0 ]; then
  "$HERE/build_horovod.sh" "$VENV"
else
  log "HARNESS_WITHOUT_HOROVOD=1: no Horovod; train with harness launch --backend torch (or torchrun)"
fi

# 4. The harness itself (editable) with its test tools, or without; or only its dependencies (Python >= 3.11).
if [ "$HARNESS_INSTALL" = editable ]; then
  "${PIP[@]}" install -e "${ROOT}[test]"
elif [ "$HARNESS_INSTALL" = run ]; then
  "${PIP[@]}" install -e "${ROOT}"
else
  read_deps='import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))'
  mapfile -t deps < <("$VENV/bin/python" -c "$read_deps" "$ROOT/pyproject.toml")
  "${PIP[@]}" install "${deps[@]}"
fi

# `import determined` in scripts run with python (Determined's Trainer scripts): harness/compat on sys.path.
[ "$HARNESS_INSTALL" = none ] || "$VENV/bin/python" -m harness.compat > /dev/null

if [ "$WITHOUT_HOROVOD" = 0 ]; then
  check="$("$VENV/bin/horovodrun" --check-build)"
  for fw in "${CHECK_BUILD[@]}"; do
    grep -q "\[X\] $fw" <<< "$check" || die "horovodrun --check-build does not list $fw"
  done
fi
echo "$want" > "$STAMP"
log "done: $VENV"
