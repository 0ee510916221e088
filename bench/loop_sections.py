"""Where a batch's time goes, line by line, at two ranks under torchrun: the harness's loop (torch backend)
against hand-written DDP (bench/ddp_loop.py).

Copies of both get a clock read (``time.perf_counter_ns``, ~0.1 µs) between the lines of their training
loop; each part's time is the span from the mark before it. Each rank writes its parts' mean and median
(the first --skip batches left out); the table is rank 0's, each number the median over the runs, which
alternate between the two. The copies live in a temporary directory; the repository is not changed. If the
loop's lines change, the anchors below must follow (the script names the one it cannot find).

    .venv/bin/python bench/loop_sections.py --batches 12000 --runs 2
    .venv/bin/python bench/loop_sections.py --workload conv --batches 3000 --runs 3
    .venv/bin/python bench/loop_sections.py --src /tmp/copy       # a copy of the harness: /tmp/copy/harness
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
from typing import Dict, List, Tuple

import ab_np2  # bench/, the script's own directory, is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TIMER = """
import atexit, json, os, time
FIRST = "next batch from the loader"  # its mark comes once per batch: it counts the batches
LAST = "duties when due"  # its last time is the run's end (validation, checkpoint): DDP's are after its loop
_now, _last, _spans = time.perf_counter_ns, [0], {}
_batches, _skip = [0], int(os.environ["SECTIONS_SKIP"])
def mark(name):
    now = _now()
    if name == FIRST:
        _batches[0] += 1
    if _last[0] and _batches[0] > _skip:
        _spans.setdefault(name, []).append(now - _last[0])
    _last[0] = now
def _write():
    n = max(1, _batches[0] - _skip)
    if _spans.get(LAST):
        _spans[LAST].pop()
    out = {name: [sum(s) / n / 1e3, sorted(s)[len(s) // 2] / 1e3, len(s)] for name, s in _spans.items() if s}
    path = os.path.join(os.environ["SECTIONS_OUT"], "rank%s.json" % os.environ.get("RANK", "0"))
    with open(path, "w") as f:
        json.dump(out, f)
atexit.register(_write)
"""

# (file, the line's text, "before" or "after", the part that ends at the mark). Parts end where the mark is.
HARNESS_MARKS = [
    (
        "harness/train/loop.py",
        "vote = votes.start(progress.batches, stop.requested, step.ends_window())",
        "before",
        "next batch from the loader",
    ),
    (
        "harness/train/loop.py",
        "batch, records = adapter.prepare(batch, device, where, non_blocking)",
        "before",
        "stop vote's start, watchdog beat",
    ),
    ("harness/train/loop.py", "with step.forward():", "before", "adapter.prepare"),
    (
        "harness/train/loop.py",
        "step.step(loss)  # backward; every aggregation_frequency batches the optimizer's step",
        "before",
        "forward pass and loss",
    ),
    ("harness/train/optimizer_step.py", "self.backward(loss)", "after", "backward pass"),
    (
        "harness/train/loop.py",
        "step.step(loss)  # backward; every aggregation_frequency batches the optimizer's step",
        "after",
        "optimizer step, zero_grad",
    ),
    (
        "harness/train/loop.py",
        "if batches < due and vote is None and late is None:",
        "before",
        "metrics, counters",
    ),
    ("harness/train/loop.py", "if schedule.done(batches):", "before", "duties when due"),
]
DDP_MARKS = [
    ("ddp_loop.py", "optimizer.zero_grad()", "before", "next batch from the loader"),
    ("ddp_loop.py", "optimizer.zero_grad()", "after", "zero_grad"),
    ("ddp_loop.py", "loss.backward()", "before", "forward pass and loss"),
    ("ddp_loop.py", "loss.backward()", "after", "backward pass"),
    ("ddp_loop.py", "step += 1", "before", "optimizer step"),
    ("ddp_loop.py", "if step >= args.batches:", "before", "metrics, counters"),
]
PARTS = [
    "next batch from the loader",
    "stop vote's start, watchdog beat",
    "adapter.prepare",
    "forward pass and loss",
    "backward pass",
    "optimizer step, zero_grad",  # DDP's: its zero_grad (before the forward pass) and step, added
    "metrics, counters",
    "duties when due",
]


def instrument(root: str, marks: List[Tuple[str, str, str, str]]) -> None:
    """Insert `_sections.mark(part)` at each anchor of the files under `root` (one line each, same indent)."""
    for path in sorted({m[0] for m in marks}):
        full = os.path.join(root, path)
        with open(full) as f:
            lines = f.read().split("\n")
        for file, text, where, part in marks:
            if file != path:
                continue
            found = [i for i, line in enumerate(lines) if line.strip() == text]
            if len(found) != 1:
                raise SystemExit(
                    f"loop_sections: {path}: the line {text!r} is there {len(found)} times, not once"
                )
            i = found[0]
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            lines.insert(i if where == "before" else i + 1, f"{indent}_sections.mark({part!r})")
        future = [i for i, line in enumerate(lines) if line.startswith("from __future__ import")]
        lines.insert(future[-1] + 1 if future else 0, "import _sections")
        with open(full, "w") as f:
            f.write("\n".join(lines))


def run(kind: str, work: str, name: str, workload: str, batches: int, skip: int) -> Dict[str, List[float]]:
    """One torchrun job of two ranks (started as ab_np2.py starts its own); rank 0's parts: {part: [mean
    µs, median µs, batches]}."""
    out = os.path.join(work, name)
    os.makedirs(out)
    src = os.path.join(work, "src")
    env = dict(SECTIONS_OUT=out, SECTIONS_SKIP=str(skip), OMP_NUM_THREADS="1")
    kwargs = "{}" if kind == "ddp" else src
    job = ab_np2.start(kind, kwargs, workload, batches, out, os.path.join(src, "ddp_loop.py"), env)
    try:
        code = job.wait()
    finally:
        ab_np2._kill_unfinished([job])
    if code != 0:
        raise SystemExit(f"loop_sections: {name} exited with {code}; its console: {out}/console.log")
    with open(os.path.join(out, "rank0.json")) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="mlp", choices=("mlp", "conv"))
    p.add_argument("--batches", type=int, default=12000)
    p.add_argument("--runs", type=int, default=2, help="runs of each, alternating")
    p.add_argument("--skip", type=int, default=500, help="batches left out at the start (warm-up)")
    p.add_argument("--src", default=ROOT, help="the directory whose harness/ is measured")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="loop-sections-")
    src = os.path.join(work, "src")
    shutil.copytree(
        os.path.join(args.src, "harness"),
        os.path.join(src, "harness"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(os.path.join(HERE, "ddp_loop.py"), src)
    os.symlink(os.path.join(HERE, "workloads"), os.path.join(src, "workloads"))  # the copy's `import common`
    with open(os.path.join(src, "_sections.py"), "w") as f:
        f.write(TIMER)
    instrument(src, HARNESS_MARKS)
    instrument(src, DDP_MARKS)
    results: Dict[str, List[Dict[str, List[float]]]] = {"ddp": [], "harness": []}
    for i in range(args.runs):
        for kind in ("ddp", "harness") if i % 2 == 0 else ("harness", "ddp"):
            results[kind].append(run(kind, work, f"{kind}-{i}", args.workload, args.batches, args.skip))
    print(
        f"rank 0, µs per batch, mean / median (the median of each over {args.runs} runs of {args.batches} "
        f"{args.workload} batches; the first {args.skip} left out)"
    )
    print(f"{'part of a batch':36} {'torchrun + DDP':>16} {'harness (torch)':>16}")
    for part in PARTS + ["whole batch"]:
        cells = [cell(results[kind], part) for kind in ("ddp", "harness")]
        print(f"{part:36} {cells[0]:>16} {cells[1]:>16}")
    print("(a part that is not due every batch: its mean is per batch, its median per time it ran)")
    print(f"(consoles and per-rank files: {work})")


def cell(runs: List[Dict[str, List[float]]], part: str) -> str:
    """`mean / median` of a part over the runs (DDP's optimizer step with its zero_grad; the whole batch's
    mean is the sum of the parts')."""
    names = {"optimizer step, zero_grad": ["optimizer step, zero_grad", "optimizer step", "zero_grad"]}
    if part == "whole batch":
        return f"{statistics.median(sum(v[0] for v in r.values()) for r in runs):.0f}"
    got = [[r[n] for n in names.get(part, [part]) if n in r] for r in runs]
    if not any(got):
        return "—"
    mean = statistics.median(sum(v[0] for v in g) for g in got)
    median = statistics.median(sum(v[1] for v in g) for g in got)
    return f"{mean:.0f} / {median:.0f}"


if __name__ == "__main__":
    main()
