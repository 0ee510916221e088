"""Interleaved A/B of per-step times at two ranks under torchrun: hand-written DDP against the harness on its
torch backend, and against patched copies of the harness.

Each repetition runs every contender once (the order rotated by one each repetition: over n repetitions of
n contenders each runs first, in the middle and last equally often) and reads rank 0's step times from
the probe of ``workloads/common.py``; it prints the 5th, 25th and 50th percentile step per
run and the median of each over the repetitions. Low percentiles move less than the mean with other
processes on the machine (they only add time), so they are what to compare on a shared 2-core VM; bench/
findings.md §9 says how far they still move there.

``--slice S`` runs a repetition's contenders at the same time instead, taking turns: every S seconds the
running one (its torchrun and ranks) is stopped with SIGSTOP and the next continued with SIGCONT, so all see
the same machine, second by second, and none competes with another for the cores. A step that spans a
pause (over 50 ms) is left out of its percentiles and mean.

    .venv/bin/python bench/ab_np2.py --batches 5000 --reps 4
    .venv/bin/python bench/ab_np2.py --contender patched=/tmp/copy   # /tmp/copy/harness: a patched copy
    .venv/bin/python bench/ab_np2.py --ddp-variant 'noinit={"init_sync": false, "broadcast_buffers": false}'
    .venv/bin/python bench/ab_np2.py --batches 20000 --reps 3 --slice 1
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "workloads"))
import common  # noqa: E402

PAUSED_MS = 50.0  # a step longer than this spans a pause of --slice (the MLP's take ~1 ms)
Quantiles = Tuple[float, float, float, float]  # p5, p25, p50, mean step ms


def start(
    kind: str,
    src: str,
    workload: str,
    batches: int,
    out: str,
    script: str = os.path.join(HERE, "ddp_loop.py"),
    extra_env: Optional[Dict[str, str]] = None,
) -> "subprocess.Popen[bytes]":
    """Start one torchrun job of `kind` ("ddp": `script`, with DDP's keywords `src` as JSON; or a harness
    under PYTHONPATH `src`); `extra_env` is added to its environment."""
    os.makedirs(out, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, BENCH_OUT=os.path.join(out, "probe"), BENCH_WARMUP="300", BENCH_STEP_TIMES="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra_env or {})
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    cmd = [os.path.join(bin_dir, "torchrun"), "--standalone", "--nproc_per_node", "2"]
    if kind == "ddp":
        env["BENCH_DDP_KWARGS"] = src
        cmd += [script, "--workload", workload, "--batches", str(batches)]
    else:
        config = os.path.join(out, "experiment.yaml")
        with open(config, "w") as f:
            f.write(common.harness_config(batches, extra="min_validation_period: {batches: 1000000}\n"))
        cmd += ["-m", "harness", os.path.join(HERE, "workloads", workload), "--config", config]
        cmd += ["--output", os.path.join(out, "output"), "--quiet"]
        # `python -m` puts the working directory first on sys.path: run in `out`, so that `src`'s harness
        # is the one imported (in ROOT, ROOT's would be, whatever PYTHONPATH says).
        env["PYTHONPATH"] = src
        env["HARNESS_BACKEND"] = "torch"
    with open(os.path.join(out, "console.log"), "wb") as log:  # what a failed job said
        # A session of its own: when a process of ours exits while this job is stopped (--slice), the
        # kernel would send an orphaned process group's stopped members SIGHUP, and torchrun dies of it.
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out, start_new_session=True
        )


def result(out: str) -> Quantiles:
    """Rank 0's p5, p25, p50 and mean step (ms), steps that span a pause left out."""
    with open(os.path.join(out, "probe", "rank0.json")) as f:
        steps = sorted(s for s in json.load(f)["step_ms"] if s < PAUSED_MS)
    p5, p25, p50 = (steps[int(len(steps) * q)] for q in (0.05, 0.25, 0.5))
    return p5, p25, p50, statistics.fmean(steps)


def _tree(pid: int) -> List[int]:
    """`pid` and its descendants (torchrun starts each rank in a session of its own: a process group
    would miss them)."""
    children: Dict[int, List[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def _signal(proc: "subprocess.Popen[bytes]", sig: int) -> None:
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_unfinished(jobs: Iterable["subprocess.Popen[bytes]"]) -> None:
    """On the way out (Ctrl-C too): no job is left stopped, or running on behind our back (each has a
    session of its own, so a terminal's Ctrl-C does not reach it)."""
    for job in jobs:
        if job.poll() is None:
            _signal(job, signal.SIGKILL)


def run_sliced(jobs: Dict[str, "subprocess.Popen[bytes]"], slice_s: float) -> None:
    """Let the jobs take turns of `slice_s` seconds until all have ended."""
    names = list(jobs)
    try:
        for name in names[1:]:
            _signal(jobs[name], signal.SIGSTOP)
        turn = 0
        while any(jobs[n].poll() is None for n in names):
            running = names[turn % len(names)]
            _signal(jobs[running], signal.SIGCONT)
            end = time.monotonic() + slice_s
            while time.monotonic() < end and jobs[running].poll() is None:
                time.sleep(0.01)
            _signal(jobs[running], signal.SIGSTOP)  # its ranks too, which the poll above does not see
            turn += 1
    finally:
        _kill_unfinished(jobs.values())


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
    p.add_argument(
        "--slice",
        type=float,
        metavar="S",
        help="run each repetition's contenders together, taking turns of S seconds (SIGSTOP/SIGCONT)",
    )
    args = p.parse_args()
    # SIGTERM (`kill`, `pkill -f ab_np2`) as Ctrl-C: the `finally`s below end the jobs. Without it Python
    # dies at once, and the sliced jobs stay behind, stopped, holding their memory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
    runs: Dict[str, List[Quantiles]] = {name: [] for name in contenders}
    names = list(contenders)
    jobs: Dict[str, subprocess.Popen[bytes]] = {}
    for i in range(args.reps):
        order = names[i % len(names) :] + names[: i % len(names)]
        outs = {name: os.path.join(work, f"{name}-{i}") for name in order}
        if args.slice:
            jobs = {n: start(*contenders[n], args.workload, args.batches, outs[n]) for n in order}
            run_sliced(jobs, args.slice)
        for name in order:
            job = (
                jobs[name]
                if args.slice
                else start(*contenders[name], args.workload, args.batches, outs[name])
            )
            try:
                job.wait()
            finally:
                _kill_unfinished([job])
            if job.returncode != 0:
                log = os.path.join(outs[name], "console.log")
                raise SystemExit(f"ab_np2: {name} exited with {job.returncode}; its console: {log}")
            q = result(outs[name])
            runs[name].append(q)
            print(
                f"rep {i} {name:10s} p5 {q[0]:.3f} p25 {q[1]:.3f} p50 {q[2]:.3f} mean {q[3]:.3f} ms",
                flush=True,
            )
    for name, qs in runs.items():
        med = [statistics.median(q[j] for q in qs) for j in range(4)]
        print(
            f"{name:10s} median over reps: p5 {med[0]:.3f} p25 {med[1]:.3f} p50 {med[2]:.3f} "
            f"mean {med[3]:.3f} ms"
        )


if __name__ == "__main__":
    main()
