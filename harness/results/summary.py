"""`harness plot` and `harness summary`: what a finished (or running) job's output directory holds."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Any, Dict, List

from harness.config.yaml12 import load_yaml_file
from harness.errors import HarnessError
from harness.output import reports
from harness.search import results as search_results

# ---------------------------------------------------------------------------------------------------------
# harness plot / summary


def _load_run(output: str) -> List[Dict[str, Any]]:
    entries = reports.read_reports(output)
    if not entries:
        raise HarnessError(f"{output}: no metrics.jsonl with reports (is this a harness output folder?)")
    return entries


def _series(entries: List[Dict[str, Any]], kind: str, name: str) -> Any:
    import numpy as np

    points = [
        (e["batches"], e["metrics"][name]) for e in entries if e["type"] == kind and name in e["metrics"]
    ]
    xs = [b for b, _ in points]
    ys = np.array([np.asarray(v, dtype=float).reshape(-1) for _, v in points])
    return xs, ys


def plot(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="harness plot", description="Write OUTPUT/curves.png.")
    p.add_argument("output")
    args = p.parse_args(argv)
    if search_results.is_search(args.output):
        print(search_results.plot(args.output))
        return 0
    entries = _load_run(args.output)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validation_names = sorted({n for e in entries if e["type"] == "validation" for n in e["metrics"]})
    panels = [("training", "loss")] + [("validation", n) for n in validation_names]
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (kind, name) in zip(axes.flat, panels):
        xs, ys = _series(entries, kind, name)
        if len(xs):
            if ys.shape[1] == 1:
                ax.plot(xs, ys[:, 0], marker="o" if kind == "validation" else None, markersize=3)
            else:  # a non-scalar metric: one line per element (the first 10)
                for i in range(min(ys.shape[1], 10)):
                    ax.plot(xs, ys[:, i], label=f"[{i}]", linewidth=1)
                ax.legend(fontsize=7, ncol=2)
        ax.set_title(name if name.startswith(kind) else f"{kind} {name}")  # not "validation validation_x"
        ax.set_xlabel("batches")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(args.output, "curves.png")
    fig.savefig(path, dpi=100)
    print(path)
    return 0


def summary(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="harness summary", description="Best and last validation metrics.")
    p.add_argument("output")
    args = p.parse_args(argv)
    if search_results.is_search(args.output):
        return search_results.print_table(args.output)
    entries = _load_run(args.output)
    metric, smaller = None, True
    path = os.path.join(args.output, "config.yaml")
    if os.path.isfile(path):
        searcher = (load_yaml_file(path) or {}).get("searcher", {})
        metric, smaller = searcher.get("metric"), searcher.get("smaller_is_better", True)
    last = entries[-1]
    print(f"run: {os.path.abspath(args.output)}")
    print(f"trained: {last['batches']} batches, {last['epoch']:.2f} epochs, {last['records']} records")
    validations = [e for e in entries if e["type"] == "validation"]
    names = sorted({n for e in validations for n in e["metrics"]})
    # Only the searcher metric has a known direction ("best"); the others show their last, min and max.
    rows = [("metric", "last", "at batch", "best", "at batch", "min", "max")]
    for name in names:
        scalar = reports.points(validations, name)
        if not scalar:
            continue
        values = [v for _, v in scalar]
        best_value, best_at = "", ""
        found = reports.best(scalar, smaller) if name == metric else None
        if found:
            best_value, best_at = f"{found[1]:.5g}", str(found[0])
        label = name + (" *" if name == metric else "")
        last_at, last_value = scalar[-1]
        rows.append(
            (label, f"{last_value:.5g}", str(last_at), best_value, best_at)
            + (f"{min(values):.5g}", f"{max(values):.5g}")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if metric:
        print(f"(* searcher.metric; best = {'smallest' if smaller else 'largest'})")
    root = os.path.join(args.output, "checkpoints")
    from harness.output.checkpoint import checkpoint_dirs

    batches = checkpoint_dirs(root)
    print("checkpoints:" if batches else "checkpoints: none")
    for b in batches:
        path = os.path.join(root, str(b))
        size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*")))
        kept = (reports.checkpoint_metrics(path) or {}).get(metric) if metric else None
        value = f"  {metric} {kept:.5g}" if isinstance(kept, (int, float)) else ""
        print(f"  batch {b:>7}  {size / 1e6:7.2f} MB{value}  {path}")
    return 0


def main(argv: List[str]) -> int:
    command, rest = argv[0], argv[1:]
    try:
        return {"plot": plot, "summary": summary}[command](rest)
    except BrokenPipeError:  # `harness summary OUT | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
