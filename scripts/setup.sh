#!/usr/bin/env bash
# Idempotent set-up: system packages, a virtualenv at $VENV (default .venv), torch, the harness, and the
# patched Horovod wheel (built once, then cached). Shared by `make setup` and the Dockerfile.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
STAMP="$VENV/.harness-setup-stamp"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# 1. System packages (Debian). Skipped when all are present, so a second run needs no network.
APT_PKGS=(openmpi-bin libopenmpi-dev build-essential cmake python3-venv)
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

# 2. Virtualenv and Python packages.
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

req_hash="$(cat "$ROOT/pyproject.toml" "$HERE/setup.sh" "$HERE/build_horovod.sh" "$HERE"/horovod-patches/* 2>/dev/null | sha256sum | cut -c1-16)"
want="torch=$TORCH_VERSION req=$req_hash"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import horovod.torch, harness" 2>/dev/null; then
  log "up to date ($VENV)"
  exit 0
fi

log "installing torch==$TORCH_VERSION and dependencies"
"${PIP[@]}" install "torch==$TORCH_VERSION"
"${PIP[@]}" install numpy pyyaml mpi4py scikit-learn cloudpickle psutil packaging cffi

# 3. Horovod: patched, built once per (horovod, torch, python, flavor), cached.
"$HERE/build_horovod.sh" "$VENV"

# 4. The harness itself (editable) with its test tools.
"${PIP[@]}" install -e "$ROOT[test]"

"$VENV/bin/horovodrun" --check-build | tee /tmp/harness-check-build.txt >/dev/null
for fw in PyTorch MPI Gloo; do
  grep -q "\[X\] $fw" /tmp/harness-check-build.txt || die "horovodrun --check-build does not list $fw"
done
echo "$want" > "$STAMP"
log "done: $VENV/bin/harness"
