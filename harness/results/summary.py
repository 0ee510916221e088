"""`harness plot` and `harness summary`: what a finished (or running) job's output directory holds.

Neither imports torch (nor, for `summary`, NumPy or matplotlib): they start in a fraction of a second.
Unreadable lines of metrics.jsonl are skipped with one warning (harness/output/reports.py)."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from harness.errors import HarnessError
from harness.output import reports

# Reported with the training metrics but not metrics of the model: drawn in panels of their own, or not.
_BOOKKEEPING = ("lr", "loss_scale", "skipped_steps")


def _is_search(output: str) -> bool:
    from harness.search import results as search_results  # (Optuna's study: only for a search)

    return search_results.is_search(output)


def _load_run(output: str) -> List[Dict[str, Any]]:
    entries = reports.read_reports(output)
    if not entries:
        raise HarnessError(f"{output}: no metrics.jsonl with reports (is this a harness output folder?)")
    return entries


def _series(entries: List[Dict[str, Any]], kind: str, name: str) -> Tuple[List[int], Any]:
    """The batches and values (one row per report, one column per element) of metric `name`."""
    import numpy as np

    xs: List[int] = []
    ys: List[Any] = []
    for e in entries:
        if e["type"] != kind or name not in e["metrics"]:
            continue
        try:
            value = np.asarray(e["metrics"][name], dtype=float).reshape(-1)
        except (TypeError, ValueError):  # a value that is not numbers: not drawn
            continue
        if ys and value.size != ys[0].size:  # a changed shape: only the first shape is drawn
            continue
        xs.append(e["batches"])
        ys.append(value)
    return xs, np.array(ys)


Curve = Tuple[str, str, str]  # (kind, metric name, legend label)


def plot_panels(entries: List[Dict[str, Any]]) -> List[Tuple[str, List[Curve]]]:
    """What `harness plot` draws: (title, curves) per panel. The loss (training, with the validation loss
    when there is one), each validation metric with the training metric of the same name, the training
    metrics that have no validation counterpart, and the learning rate when it was recorded."""
    names: Dict[str, List[str]] = {"training": [], "validation": []}
    for e in entries:
        if e["type"] in names:
            names[e["type"]] += [n for n in e["metrics"] if n not in names[e["type"]]]
    training, validation = names["training"], sorted(names["validation"])
    loss: List[Curve] = [("training", "loss", "training")] if "loss" in training else []
    val_loss = next((n for n in ("validation_loss", "loss") if n in validation), None)
    if val_loss:
        loss.append(("validation", val_loss, "validation"))
    panels = [("loss", loss)] if loss else []
    for name in validation:
        if name == val_loss:
            continue
        curves: List[Curve] = [("validation", name, "validation")]
        title = (
            name if name.startswith("validation") else f"validation {name}"
        )  # not "validation validation_x"
        if name in training:  # the training metric of the same name, for comparison
            curves, title = [("training", name, "training")] + curves, name
        panels.append((title, curves))
    for name in training:
        if name != "loss" and name not in validation and name not in _BOOKKEEPING:
            panels.append((f"training {name}", [("training", name, "training")]))
    if "lr" in training:
        panels.append(("learning rate (lr)", [("training", "lr", "lr")]))
    return panels


def plot(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="harness plot", description="Write OUTPUT/curves.png.")
    p.add_argument("output")
    args = p.parse_args(argv)
    if _is_search(args.output):
        from harness.search import results as search_results

        print(search_results.plot(args.output))
        return 0
    entries = _load_run(args.output)
    panels = plot_panels(entries)
    if not panels:
        raise HarnessError(f"{args.output}: metrics.jsonl holds no metrics to draw")

    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figures

    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels):
        labelled = False
        for kind, name, label in curves:
            xs, ys = _series(entries, kind, name)
            if not xs:
                continue
            marker = "o" if kind == "validation" else None
            if ys.shape[1] == 1:
                ax.plot(xs, ys[:, 0], marker=marker, markersize=3, label=label)
                labelled = labelled or len(curves) > 1
            else:  # a non-scalar metric: one line per element (the first 10)
                for i in range(min(ys.shape[1], 10)):
                    ax.plot(xs, ys[:, i], label=f"{label} [{i}]", linewidth=1, marker=marker, markersize=2)
                labelled = True
        if labelled:
            ax.legend(fontsize=7, ncol=2)
        ax.set_title(title)
        ax.set_xlabel("batches")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(args.output, "curves.png")
    fig.savefig(path, dpi=100)
    print(path)
    return 0


def shape_of(value: Any) -> Optional[str]:
    """`[10 values]`, `[3x4 values]` for a (nested) list metric; None for anything else."""
    if not isinstance(value, list):
        return None
    dims = []
    while isinstance(value, list):
        dims.append(len(value))
        value = value[0] if value else None
    return f"[{'x'.join(map(str, dims))} values]"


def _searcher(output: str) -> Tuple[Optional[str], bool]:
    path = os.path.join(output, "config.yaml")
    if not os.path.isfile(path):
        return None, True
    from harness.config.yaml12 import load_yaml_file

    searcher = (load_yaml_file(path) or {}).get("searcher", {})
    return searcher.get("metric"), searcher.get("smaller_is_better", True)


def summary_rows(
    entries: List[Dict[str, Any]], metric: Optional[str], smaller: bool
) -> List[Tuple[str, ...]]:
    """The table of validation metrics: last, best (the searcher metric's), min and max of each number;
    a non-scalar metric (a list) shows its shape, at its last report."""
    validations = [e for e in entries if e["type"] == "validation"]
    names = sorted({n for e in validations for n in e["metrics"]})
    # Only the searcher metric has a known direction ("best"); the others show their last, min and max.
    rows: List[Tuple[str, ...]] = [("metric", "last", "at batch", "best", "at batch", "min", "max")]
    for name in names:
        label = name + (" *" if name == metric else "")
        scalar = reports.points(validations, name)
        if not scalar:
            last = next(e for e in reversed(validations) if name in e["metrics"])
            shown = shape_of(last["metrics"][name]) or type(last["metrics"][name]).__name__
            rows.append((label, shown, str(last["batches"]), "", "", "", ""))
            continue
        values = [v for _, v in scalar]
        best_value, best_at = "", ""
        found = reports.best(scalar, smaller) if name == metric else None
        if found:
            best_value, best_at = f"{found[1]:.5g}", str(found[0])
        last_at, last_value = scalar[-1]
        rows.append(
            (label, f"{last_value:.5g}", str(last_at), best_value, best_at)
            + (f"{min(values):.5g}", f"{max(values):.5g}")
        )
    return rows


def summary(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="harness summary", description="Best and last validation metrics.")
    p.add_argument("output")
    args = p.parse_args(argv)
    if _is_search(args.output):
        from harness.search import results as search_results

        return search_results.print_table(args.output)
    entries = _load_run(args.output)
    metric, smaller = _searcher(args.output)
    last = entries[-1]
    epoch, records = last.get("epoch"), last.get("records")
    print(f"run: {os.path.abspath(args.output)}")
    epochs = f"{epoch:.2f}" if isinstance(epoch, (int, float)) else "?"
    records = records if records is not None else "?"
    print(f"trained: {last['batches']} batches, {epochs} epochs, {records} records")
    rows = summary_rows(entries, metric, smaller)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if metric:
        print(f"(* searcher.metric; best = {'smallest' if smaller else 'largest'})")
    root = os.path.join(args.output, "checkpoints")
    batches = reports.checkpoint_dirs(root)
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
