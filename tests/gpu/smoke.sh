#!/usr/bin/env bash
# GPU smoke check (run by hand on a machine with NVIDIA GPUs; CI has none):
#   1. the harness in one process on CUDA (samples/digits, no Horovod);
#   2. Horovod built with NCCL (scripts/build_horovod.sh, the same patches) if the Python lacks it;
#   3. one rank per GPU under horovodrun --gloo: NCCL allreduce/broadcast, then training batches of
#      samples/digits on CUDA through the harness.
# usage: tests/gpu/smoke.sh [OUT_DIR]
# env: PYTHON (default python3); offline machines: HOROVOD_SDIST (Horovod's sdist) and WHEELS (a folder of
#      wheels for what the build needs and the Python lacks, e.g. cffi and pycparser)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-/tmp/harness-gpu-smoke}"
PY="$(command -v "${PYTHON:-python3}")"
VENV="$(dirname "$(dirname "$PY")")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$VENV/bin:/usr/local/cuda/bin:$PATH"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "GPUs"
nvidia-smi -L
NGPU="$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print(torch.cuda.device_count())')"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

check_metrics() {  # OUTPUT MIN_ACCURACY
  "$PY" - "$@" <<'PYEOF'
import json, sys
entries = [json.loads(x) for x in open(sys.argv[1] + "/metrics.jsonl")]
last = [e for e in entries if e["type"] == "validation"][-1]
print("last validation:", last["batches"], last["metrics"])
assert last["metrics"]["accuracy"] >= float(sys.argv[2]), last
PYEOF
}

step "1. harness, one process, CUDA"
"$PY" -m harness "$ROOT/samples/digits" --output "$OUT/local" --quiet --fresh | tee "$OUT/local.log"
grep -q "training on cuda:0" "$OUT/local.log"
check_metrics "$OUT/local" 0.95

step "2. Horovod with NCCL"
if ! "$PY" -c 'import horovod.torch as h; assert h.nccl_built()' 2>/dev/null; then
  if ! command -v mpicc >/dev/null; then export HOROVOD_WITHOUT_MPI=1; fi
  if [ -n "${WHEELS:-}" ]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS"
    "$PY" -m pip install -q cffi
  fi
  cc="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')"
  export HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-$cc}" HOROVOD_GPU_OPERATIONS=NCCL
  # NCCL from the nvidia-nccl wheel that torch's CUDA build depends on, when there is no system NCCL.
  nccl="$("$PY" -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)"
  if [ -n "$nccl" ] && [ -f "$nccl/include/nccl.h" ]; then
    mkdir -p /tmp/nccl-link
    ln -sf "$(ls "$nccl"/lib/libnccl.so* | head -n1)" /tmp/nccl-link/libnccl.so
    export HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB=/tmp/nccl-link HOROVOD_NCCL_LINK=SHARED
    export LD_LIBRARY_PATH="$nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  export HARNESS_WHEEL_CACHE="${HARNESS_WHEEL_CACHE:-$OUT/wheels}"
  MAKEFLAGS="-j$(nproc)" "$ROOT/scripts/build_horovod.sh" "$VENV" || {
    tail -n 60 "$HARNESS_WHEEL_CACHE"/*.log; exit 1; }
fi
horovodrun --check-build

step "3a. NCCL allreduce, one rank per GPU ($NGPU)"
horovodrun --gloo -np "$NGPU" -H "localhost:$NGPU" "$PY" "$ROOT/tests/gpu/nccl_check.py"

step "3b. harness under horovodrun on CUDA"
cat > "$OUT/short.yaml" <<YAML
hyperparameters: {global_batch_size: 64, learning_rate: 0.003, width: 16}
searcher: {metric: accuracy, smaller_is_better: false, max_length: {epochs: 8}}
scheduling_unit: 10
reproducibility: {experiment_seed: 42}
data: {validation_records: 360}
YAML
horovodrun --gloo -np "$NGPU" -H "localhost:$NGPU" "$PY" -m harness "$ROOT/samples/digits" \
  --config "$OUT/short.yaml" --output "$OUT/hvd" --quiet --fresh | tee "$OUT/hvd.log"
grep -q "training on cuda:0 with $NGPU rank(s) (gloo)" "$OUT/hvd.log"
check_metrics "$OUT/hvd" 0.95
step "GPU smoke check passed"
