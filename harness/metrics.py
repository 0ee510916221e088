"""Metric accumulation on the device, one reduction across ranks per report, and the sinks."""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

import numpy as np
import torch

from harness.errors import HarnessError

Reduced = Dict[str, Any]  # name -> float or nested list of floats


def as_tensor(value: Any, name: str, device: torch.device, where: str) -> torch.Tensor:
    """A metric value (tensor, ndarray or Python number) as a detached float64 tensor on `device`."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(value).to(device=device, dtype=torch.float64)
    if isinstance(value, (numbers.Real, np.number)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64, device=device)
    raise HarnessError(
        f"{where} returned metric '{name}' as a {type(value).__name__}; expected a tensor, ndarray or number"
    )


class MetricAccumulator:
    """Weighted sums of metrics, kept on the device; `reduce` makes one allreduce for all of them.

    Training metrics are added with weight 1 per batch (a mean over batches and ranks); validation metrics
    with the batch's number of records, which makes the result the exact mean over the whole data set.
    """

    def __init__(self, device: torch.device, where: str):
        self.device = device
        self.where = where
        self.sums: Dict[str, torch.Tensor] = {}
        self.weight = 0.0

    def add(self, metrics: Dict[str, Any], weight: float = 1.0) -> None:
        if not isinstance(metrics, dict):
            raise HarnessError(
                f"{self.where} returned a {type(metrics).__name__}; expected a dict of metrics"
            )
        for name, value in metrics.items():
            t = as_tensor(value, name, self.device, self.where)
            if weight != 1.0:
                t = t * weight
            prev = self.sums.get(name)
            if prev is None:
                self.sums[name] = t.clone()
            elif prev.shape != t.shape:
                raise HarnessError(
                    f"{self.where}: metric '{name}' changed shape "
                    f"from {tuple(prev.shape)} to {tuple(t.shape)}"
                )
            else:
                prev.add_(t)
        self.weight += weight

    def reduce(self, backend: Any) -> Reduced:
        """The weighted means over every rank, as Python numbers (nested lists for non-scalars)."""
        names = sorted(self.sums)
        parts = [self.sums[n].reshape(-1) for n in names]
        weight = torch.tensor([self.weight], dtype=torch.float64, device=self.device)
        flat = backend.allreduce_sum(torch.cat(parts + [weight])).cpu()
        total = flat[-1].item()
        out: Reduced = {}
        offset = 0
        for n, p in zip(names, parts):
            value = (flat[offset : offset + p.numel()] / total).reshape(self.sums[n].shape)
            out[n] = value.item() if value.dim() == 0 else value.tolist()
            offset += p.numel()
        self.sums.clear()
        self.weight = 0.0
        return out


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        flat = np.asarray(value).reshape(-1)
        shown = " ".join(f"{v:.4g}" for v in flat[:4])
        return f"[{shown}{' ...' if flat.size > 4 else ''}]"
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


class Reporter:
    """Rank 0's sinks: one JSON object per report in OUTPUT/metrics.jsonl and one line on stdout."""

    def __init__(self, output_dir: str, enabled: bool, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file: Optional[TextIO] = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self._file = open(self.path, "w")

    def report(self, kind: str, batches: int, epoch: float, records: int, metrics: Reduced) -> None:
        if not self.enabled:
            return
        entry = {
            "type": kind,
            "batches": batches,
            "epoch": round(epoch, 6),
            "records": records,
            "metrics": metrics,
            "time": time.time(),
        }
        assert self._file is not None
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        print(f"[{kind:<10}] batch {batches:>6}  epoch {epoch:6.2f}  {shown}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def first_nonfinite(values: List[torch.Tensor]) -> Optional[int]:
    """Index of the first non-finite scalar in `values` (one host sync), or None."""
    if not values:
        return None
    bad = (~torch.isfinite(torch.stack(values))).nonzero()
    return int(bad[0].item()) if bad.numel() else None
