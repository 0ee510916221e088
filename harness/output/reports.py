"""Reading what a run reported: OUTPUT/metrics.jsonl (one JSON object per report) and the validation metrics
that each checkpoint keeps. `harness summary`, `plot`, `search` and checkpoint retention read through here.
No torch here: `harness summary` and `harness plot` start fast."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from harness.errors import say

METRICS_FILE = "metrics.jsonl"
Point = Tuple[int, float]  # (batches, value)


def _problem(raw: bytes) -> Tuple[Optional[Dict[str, Any]], str]:
    """(the report on one line, "") or (None, what is wrong with the line)."""
    try:
        entry = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    except ValueError:
        return None, "not JSON"
    if not isinstance(entry, dict):
        return None, f"a JSON {type(entry).__name__}, not an object"
    if not isinstance(entry.get("type"), str) or not isinstance(entry.get("metrics"), dict):
        return None, "not a report (no 'type' or 'metrics')"
    batches = entry.get("batches")
    if isinstance(batches, bool) or not isinstance(batches, int):
        return None, "not a report ('batches' is not an integer)"
    return entry, ""


def read_checked(path: str) -> Tuple[List[Dict[str, Any]], List[Tuple[int, str]]]:
    """The reports in a metrics.jsonl file (or the one in folder `path`), and the unreadable lines as
    (line number, what is wrong). A torn last line (a killed writer: no newline at its end) is neither."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    entries: List[Dict[str, Any]] = []
    bad: List[Tuple[int, str]] = []
    try:
        with open(path, "rb") as f:  # bytes: a damaged line must not end the reading of the others
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return entries, bad
    except OSError as e:
        return entries, [(0, f"cannot be read ({e.strerror or type(e).__name__})")]
    torn = lines.pop()  # what follows the last newline: b"" unless the writer was killed mid-line
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        entry, problem = _problem(raw)
        if entry is None:
            bad.append((number, problem))
        else:
            entries.append(entry)
    if torn.strip():
        entry, _ = _problem(torn)
        if entry is not None:  # a complete last report whose newline was not written yet
            entries.append(entry)
    return entries, bad


def unreadable_message(path: str, bad: List[Tuple[int, str]], kept: int) -> str:
    """One line naming the file and the unreadable lines (the first three in full)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if bad and bad[0][0] == 0:
        return f"{path} {bad[0][1]}; no reports read from it"
    shown = "; ".join(f"line {n}: {what}" for n, what in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    lines = "line" if len(bad) == 1 else "lines"
    return f"{path}: skipped {len(bad)} unreadable {lines} ({shown}{more}); kept the {kept} readable reports"


def read_reports(path: str, warn: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """The reports in a metrics.jsonl file, or in the one in folder `path`. Unreadable lines (a damaged
    byte, a line that is not a report) are skipped, and said in one warning line on stderr (or to `warn`);
    a torn last line (a killed writer) is ignored silently."""
    entries, bad = read_checked(path)
    if bad:
        message = unreadable_message(path, bad, len(entries))
        if warn is not None:
            warn(message)
        else:
            say(f"harness: warning: {message}", sys.stderr)
    return entries


def checkpoint_dirs(root: str) -> List[int]:
    """The batch numbers of the checkpoint folders under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    return sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True)


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
