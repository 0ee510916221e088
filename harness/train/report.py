"""Rank 0's sinks for reports: metrics.jsonl, TensorBoard, and the console (a tqdm bar on a terminal)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, Iterator, Optional, TextIO

import numpy as np

from harness.errors import say
from harness.output.reports import METRICS_FILE, read_reports

Reduced = Dict[str, Any]  # a report's metrics: name -> float, or nested lists of floats (no torch here)


def _number(v: float) -> str:
    """Four decimals in the usual range (so that columns line up: 0.3600, 1.0000), else scientific."""
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        flat = np.asarray(value, dtype=float).reshape(-1)
        shown = " ".join(_number(float(v)) for v in flat[:4])
        return f"[{shown}{' ...' if flat.size > 4 else ''}]"
    return _number(value) if isinstance(value, float) and math.isfinite(value) else str(value)


def format_metrics(metrics: Reduced) -> str:
    """`accuracy 0.9806  loss 0.0754`: a console line's metrics."""
    return "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


def duration(seconds: float) -> str:
    """`45s`, `3m12s`, `2h05m`: an ETA on the console."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Reporter:
    """One JSON object per report in OUTPUT/metrics.jsonl, TensorBoard scalars, one line on the console.

    `resume_at`: the batch of the checkpoint a run resumes from; reports after it (written before the
    interruption, to be written again) are dropped, so the files hold each report exactly once.

    Every training report carries the throughput of its period (samples and batches per second of training,
    validations and checkpoints left out: `aside()`), and the console line the time left at that pace.
    Use it as a context manager: it closes its files however training ends.
    """

    # TensorBoard's training scalars are flushed by its writer's thread this often, not at each report
    # (a flush every report cost ~0.3 ms on rank 0, which the other ranks then wait for); validations,
    # and the end of the run, flush at once.
    FLUSH_SECONDS = 5

    def __init__(
        self,
        output_dir: str,
        enabled: bool,
        resume_at: Optional[int] = None,
        progress_bar: bool = False,
        stream: Optional[TextIO] = None,
    ):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._file: Optional[TextIO] = None
        self._tb: Any = None
        self._bar: Any = None
        self._bar_wanted = progress_bar
        self._last_loss: Optional[float] = None
        self.total: Optional[int] = None  # batches the run trains (for the ETA)
        self._tick: Optional[float] = None  # when the last batch ended, or training went on after an aside
        self._busy = 0.0  # seconds of training in this report period
        self._period = [0, 0]  # batches, records in this report period
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        kept = [e for e in read_reports(self.path) if resume_at is not None and e["batches"] <= resume_at]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after the checkpoint we resume from.
        purge = resume_at + 1 if resume_at is not None else None
        self._tb = SummaryWriter(
            os.path.join(output_dir, "tensorboard"), purge_step=purge, flush_secs=self.FLUSH_SECONDS
        )

    # -- progress ------------------------------------------------------------------------------------
    def start_period(self, batches: int, records_per_batch: int) -> None:
        """A progress bar over the next report period (rank 0, a terminal, not --quiet)."""
        if not (self.enabled and self._bar_wanted):
            return
        from tqdm import tqdm

        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(
            total=batches * records_per_batch,
            unit="rec",
            unit_scale=True,
            desc="train",
            leave=False,
            file=self.stream,
        )
        if self._last_loss is not None:
            self._bar.set_postfix(loss=f"{self._last_loss:.4g}")

    def start_training(self, total: int) -> None:
        """Training starts now, toward batch `total`."""
        self.total, self._tick = total, time.perf_counter()

    def advance(self, records: int) -> None:
        """One global batch of `records` records trained."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._tick is not None:
            self._busy += now - self._tick
        self._tick = now
        self._period[0] += 1
        self._period[1] += records
        if self._bar is not None:
            self._bar.update(records)

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Time spent in the block (a validation, a checkpoint) is not training time."""
        try:
            yield
        finally:
            self._tick = time.perf_counter()

    def _throughput(self) -> Dict[str, float]:
        batches, records = self._period
        busy, self._busy, self._period = self._busy, 0.0, [0, 0]
        if busy <= 0 or batches == 0:
            return {}
        return {"samples_per_second": records / busy, "batches_per_second": batches / busy}

    # -- reports ------------------------------------------------------------------------------------
    def report(self, kind: str, batches: int, epoch: float, records: int, metrics: Reduced) -> None:
        if not self.enabled:
            return
        entry: Dict[str, Any] = {
            "type": kind,
            "batches": batches,
            "epoch": round(epoch, 6),
            "records": records,
            "metrics": metrics,
            "time": time.time(),
        }
        rates = self._throughput() if kind == "training" else {}
        if rates:
            entry["throughput"] = rates
        assert self._file is not None
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        for name, value in metrics.items():
            self._tensorboard(f"{kind}/{name}", value, batches)
        for name, value in rates.items():
            self._tensorboard(f"throughput/{name}", value, batches)
        if kind != "training":  # training's scalars reach the file within FLUSH_SECONDS (its writer's thread)
            self._tb.flush()
        if kind == "training" and isinstance(metrics.get("loss"), float):
            self._last_loss = metrics["loss"]
        line = f"[{kind:<10}] batch {batches:>6}  epoch {epoch:6.2f}  {format_metrics(metrics)}"
        if rates:
            line += f"  ({rates['samples_per_second']:,.0f} samples/s"
            if self.total is not None and batches < self.total:
                line += f", ETA {duration((self.total - batches) / rates['batches_per_second'])}"
            line += ")"
        self.log(line)
        if kind == "training":
            self._tick = time.perf_counter()  # the report's own time (a reduction, the files) is not training

    def _tensorboard(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, list):  # non-scalar: one scalar per element
            for i, v in enumerate(np.asarray(value, dtype=float).reshape(-1)):
                self._tb.add_scalar(f"{tag}/{i}", float(v), step)
        else:
            self._tb.add_scalar(tag, float(value), step)

    def log(self, line: str) -> None:
        """A line on the console, around the progress bar if there is one."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            say(line, self.stream)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
