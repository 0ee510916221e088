"""`harness summary` and `harness plot` on a search's output: a table of its trials, and every trial's
searcher metric in one figure."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from harness.errors import HarnessError
from harness.output import reports
from harness.search import study as search_study

SEARCH_FILE = "search.json"


def is_search(output: str) -> bool:
    return os.path.isfile(os.path.join(output, SEARCH_FILE))


def _info(output: str) -> Dict[str, Any]:
    with open(os.path.join(output, SEARCH_FILE), encoding="utf-8") as f:
        return json.load(f)


def trials(output: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """The search's settings and one row per trial, best first (failed and unfinished last)."""
    info = _info(output)
    study = search_study.load(info["storage"], info["study"])
    rows = []
    for t in study.get_trials(deepcopy=False):
        folder = os.path.join(output, "trials", str(t.number))
        entries = reports.read_reports(folder)
        found = reports.best(reports.points(entries, info["metric"]), info["smaller_is_better"])
        best = found[1] if found else None
        state = {"COMPLETE": "completed", "PRUNED": "stopped early"}.get(t.state.name, t.state.name.lower())
        if state == "running" and _interrupted(t):
            state = "interrupted"
        rows.append(
            {
                "number": t.number,
                "state": state,
                "hparams": t.user_attrs.get(search_study.HPARAMS, {}),
                "best": best,
                "best_at": found[0] if found else None,
                "batches": entries[-1]["batches"] if entries else 0,
                "error": t.user_attrs.get(search_study.ERROR, ""),
                "folder": folder,
            }
        )
    sign = 1 if info["smaller_is_better"] else -1
    rows.sort(
        key=lambda r: (r["best"] is None, sign * r["best"] if r["best"] is not None else 0, r["number"])
    )
    return info, rows


def _interrupted(t: Any) -> bool:
    """A running trial whose search stopped it (SIGTERM) or died (SIGKILL): the same command resumes it."""
    if t.user_attrs.get(search_study.INTERRUPTED):
        return True
    owner = t.system_attrs.get(search_study.OWNER)
    return owner is None or not search_study.alive(owner)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(output: str) -> int:
    """The trials, best first, and where the best trial's checkpoints are. 1 if every trial failed."""
    info, rows = trials(output)
    names = sorted({n for r in rows for n in r["hparams"]})
    # The metric's best validation (not its last), the batch of that validation, and the batches trained.
    header = ["trial", "state", *names, f"best {info['metric']}", "at batch", "batches"]
    table = [header] + [
        [str(r["number"]), r["state"], *(_cell(r["hparams"].get(n, "")) for n in names)]
        + ([_cell(r["best"]), str(r["best_at"])] if r["best"] is not None else ["-", "-"])
        + [str(r["batches"])]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"search: {os.path.abspath(output)} ({info['searcher']}, {len(rows)} of {info['trials']} trials)")
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in rows:
        if r["error"]:
            print(f"trial {r['number']} failed: {r['error']}")
    interrupted = [str(r["number"]) for r in rows if r["state"] == "interrupted"]
    if interrupted:
        print(f"interrupted: trial(s) {', '.join(interrupted)}; the same harness search command resumes them")
    best = _best_trial(rows)
    if best is None:  # 1 once every trial has failed; trials still running (on another machine) may report
        print("no trial reported the searcher metric")
        return 1 if all(r["state"] == "fail" for r in rows) else 0
    print(f"best trial: {best['number']} ({info['metric']} {best['best']:.5g}); its best checkpoint: "
          f"{_best_checkpoint(best['folder'], info) or 'none'}")  # fmt: skip
    return 0


def _best_checkpoint(folder: str, info: Dict[str, Any]) -> Optional[str]:
    """The trial's checkpoint with the best searcher metric (checkpoints keep their validation metrics)."""
    root = os.path.join(folder, "checkpoints")  # (reports, not checkpoint: no torch for a summary)
    ranked = reports.ranked_checkpoints(
        root, reports.checkpoint_dirs(root), info["metric"], info["smaller_is_better"]
    )
    return os.path.join(root, str(ranked[0])) if ranked else None


def _best_trial(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    done = [r for r in rows if r["best"] is not None and r["state"] == "completed"]
    return done[0] if done else next((r for r in rows if r["best"] is not None), None)


def plot(output: str) -> str:
    """OUTPUT/search.png: every trial's searcher metric against batches; stopped trials dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info, rows = trials(output)
    if not rows:
        raise HarnessError(f"{output}: the search has no trials yet")
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in sorted(rows, key=lambda r: r["number"]):
        points = reports.points(reports.read_reports(r["folder"]), info["metric"])
        if not points:
            continue
        style = "--" if r["state"] == "stopped early" else "-"
        xs, ys = zip(*points)
        ax.plot(xs, ys, style, marker="o", markersize=3, label=f"trial {r['number']} ({r['state']})")
    ax.set_xlabel("batches")
    ax.set_ylabel(f"validation {info['metric']}")
    ax.set_title(f"{info['searcher']} search: {len(rows)} trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = os.path.join(output, "search.png")
    fig.savefig(path, dpi=100)
    return path
