"""Interleaved A/B of per-step times at two ranks under torchrun: hand-written DDP against the harness on its
torch backend, and against patched copies of the harness.

Each repetition runs every contender once (the order rotated by one each repetition: over n repetitions of
n contenders each runs first, in the middle and last equally often) and reads rank 0's step times from
the probe of ``workloads/common.py``; it prints the 5th, 25th and 50th percentile step per
run and the median of each over the repetitions. Low percentiles move less than the mean with other
processes on the machine (they only add time), so they are what to compare on a shared 2-core VM; bench/
findings.md §9 says how far they still move there.

    .venv/bin/python bench/ab_np2.py --batches 5000 --reps 4
    .venv/bin/python bench/ab_np2.py --contender patched=/tmp/copy   # /tmp/copy/harness: a patched copy
    .venv/bin/python bench/ab_np2.py --ddp-variant 'noinit={"init_sync": false, "broadcast_buffers": false}'
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(kind: str, src: str, workload: str, batches: int, out: str) -> Tuple[float, float, float]:
    """One torchrun job of `kind` ("ddp", with DDP's keywords `src` as JSON, or a harness under PYTHONPATH
    `src`): rank 0's (p5, p25, p50) ms."""
    os.makedirs(out, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, BENCH_OUT=os.path.join(out, "probe"), BENCH_WARMUP="300", BENCH_STEP_TIMES="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    cmd = [os.path.join(bin_dir, "torchrun"), "--standalone", "--nproc_per_node", "2"]
    if kind == "ddp":
        env["BENCH_DDP_KWARGS"] = src
        cmd += [os.path.join(HERE, "ddp_loop.py"), "--workload", workload, "--batches", str(batches)]
    else:
        config = os.path.join(out, "experiment.yaml")
        with open(config, "w") as f:
            f.write(
                f"searcher:\n  max_length: {{batches: {batches}}}\nscheduling_unit: 100\n"
                "min_validation_period: {batches: 1000000}\n"
            )
        cmd += ["-m", "harness", os.path.join(HERE, "workloads", workload), "--config", config]
        cmd += ["--output", os.path.join(out, "output"), "--quiet"]
        env["PYTHONPATH"] = src
        env["HARNESS_BACKEND"] = "torch"
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT, check=True)
    with open(os.path.join(out, "probe", "rank0.json")) as f:
        steps = sorted(json.load(f)["step_ms"])
    return tuple(steps[int(len(steps) * q)] for q in (0.05, 0.25, 0.5))  # type: ignore[return-value]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="mlp")
    p.add_argument("--batches", type=int, default=5000)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument(
        "--contender",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a harness copy to add (DIR holds its harness/ package); repeatable",
    )
    p.add_argument(
        "--ddp-variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="ddp_loop.py with these DistributedDataParallel keywords (JSON); repeatable",
    )
    args = p.parse_args()
    contenders: Dict[str, Tuple[str, str]] = {"ddp": ("ddp", "{}"), "torch": ("harness", ROOT)}  # (kind, src)
    for c in args.contender:
        name, _, src = c.partition("=")
        contenders[name] = ("harness", os.path.abspath(src))
    for c in args.ddp_variant:
        name, _, kwargs = c.partition("=")
        try:  # a typo fails here, in one line, not in two ranks
            json.loads(kwargs)
        except ValueError as e:
            p.error(f"--ddp-variant {name}: not JSON ({e})")
        contenders[name] = ("ddp", kwargs)
    work = tempfile.mkdtemp(prefix="ab-np2-")
    runs: Dict[str, List[Tuple[float, float, float]]] = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(args.reps):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            kind, src = contenders[name]
            q = run(kind, src, args.workload, args.batches, os.path.join(work, f"{name}-{i}"))
            runs[name].append(q)
            print(f"rep {i} {name:10s} p5 {q[0]:.3f} p25 {q[1]:.3f} p50 {q[2]:.3f} ms", flush=True)
    for name, qs in runs.items():
        med = [statistics.median(q[j] for q in qs) for j in range(3)]
        print(f"{name:10s} median over reps: p5 {med[0]:.3f} p25 {med[1]:.3f} p50 {med[2]:.3f} ms")


if __name__ == "__main__":
    main()
