"""Reading what a run reported: OUTPUT/metrics.jsonl (one JSON object per report) and the validation metrics
that each checkpoint keeps. `harness summary`, `plot`, `search` and checkpoint retention read through here."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

METRICS_FILE = "metrics.jsonl"
Point = Tuple[int, float]  # (batches, value)


def read_reports(path: str) -> List[Dict[str, Any]]:
    """The reports in a metrics.jsonl file, or in the one in folder `path`; a torn last line (a killed
    writer) is ignored."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    entries = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    break
    return entries


def points(entries: Iterable[Dict[str, Any]], name: str, kind: str = "validation") -> List[Point]:
    """(batches, value) of every `kind` report whose metric `name` is a number, in order."""
    out = []
    for e in entries:
        value = e["metrics"].get(name) if e["type"] == kind else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((e["batches"], float(value)))
    return out


def best(found: List[Point], smaller_is_better: bool) -> Optional[Point]:
    """The best point (the earliest of equal ones), or None."""
    if not found:
        return None
    return (min if smaller_is_better else max)(found, key=lambda p: p[1])


def checkpoint_metrics(path: str) -> Optional[Dict[str, Any]]:
    """The validation metrics a checkpoint folder keeps in its state.json, or None if unreadable."""
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            metrics = json.load(f)["validation_metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return metrics if isinstance(metrics, dict) else None


def ranked_checkpoints(root: str, batches: Iterable[int], metric: str, smaller_is_better: bool) -> List[int]:
    """The checkpoints `batches` under `root` that keep a number for `metric`, best first (the newer first
    among equals)."""
    scored = []
    for b in batches:
        value = (checkpoint_metrics(os.path.join(root, str(b))) or {}).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scored.append((value if smaller_is_better else -value, -b))
    return [-negative for _, negative in sorted(scored)]
