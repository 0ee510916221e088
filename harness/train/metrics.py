"""Metric accumulation on the device, one reduction across ranks per report, and the sinks."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from harness.distributed.backend import Backend
from harness.errors import HarnessError
from harness.train.report import Reduced


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

    Each metric has its own weight. Training metrics are added with weight 1 per batch (a mean over the
    batches and ranks that reported them); validation metrics with the batch's number of records, which
    makes the result the exact mean over the whole data set.
    """

    def __init__(self, device: torch.device, where: str):
        self.device = device
        self.where = where
        self.sums: Dict[str, torch.Tensor] = {}
        self.weights: Dict[str, float] = {}

    def add(self, metrics: Dict[str, Any], weight: float = 1.0) -> None:
        if not isinstance(metrics, dict):
            raise HarnessError(
                f"{self.where} returned a {type(metrics).__name__}; expected a dict of metrics"
            )
        for name, value in metrics.items():
            t = as_tensor(value, name, self.device, self.where)
            prev = self.sums.get(name)
            if prev is None:
                self.sums[name] = t * weight  # a new tensor: never aliases the user's
                self.weights[name] = weight
            elif prev.shape != t.shape:
                raise HarnessError(
                    f"{self.where}: metric '{name}' changed shape "
                    f"from {tuple(prev.shape)} to {tuple(t.shape)}"
                )
            else:
                prev.add_(t, alpha=weight)  # weighted without a temporary
                self.weights[name] += weight

    def add_values(self, name: str, values: List[torch.Tensor]) -> None:
        """Add per-batch scalars (weight 1 each) at once: one stack and one sum, not a kernel per batch."""
        if not values:
            return
        total = torch.stack(values).sum(dtype=torch.float64).to(self.device)
        prev = self.sums.get(name)
        if prev is None:
            self.sums[name] = total
            self.weights[name] = 0.0
        else:
            prev.add_(total)
        self.weights[name] += len(values)

    def totals(self, backend: Backend) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """The sums and weights over every rank, undivided (for a checkpoint); clears this rank's."""
        flat, unpack = self._packed()
        return unpack(backend.allreduce_sum(flat))

    def start_totals(
        self, backend: Backend
    ) -> Callable[[], Tuple[Dict[str, torch.Tensor], Dict[str, float]]]:
        """`totals`, its allreduce started: what it returns waits for it (this rank's are cleared now)."""
        flat, unpack = self._packed()
        wait = backend.start_sum(flat)
        return lambda: unpack(wait())

    def _packed(
        self,
    ) -> Tuple[torch.Tensor, Callable[[torch.Tensor], Tuple[Dict[str, torch.Tensor], Dict[str, float]]]]:
        """Every sum and weight in one buffer (one allreduce), and how to unpack the reduced buffer; clears
        this rank's."""
        names = sorted(self.sums)
        shapes = [self.sums[n].shape for n in names]
        parts = [self.sums[n].reshape(-1) for n in names]
        # The weights travel in the same buffer; the trailing 0 keeps it non-empty.
        weights = torch.tensor([self.weights[n] for n in names] + [0.0], dtype=torch.float64)
        flat = torch.cat(parts + [weights.to(self.device)])
        self.sums, self.weights = {}, {}

        def unpack(reduced: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
            host = reduced.cpu()
            sums, offset = {}, 0
            for n, shape, p in zip(names, shapes, parts):
                sums[n] = host[offset : offset + p.numel()].reshape(shape).clone()
                offset += p.numel()
            return sums, {n: float(w) for n, w in zip(names, host[offset:].tolist())}

        return flat, unpack

    def load(self, sums: Dict[str, torch.Tensor], weights: Union[Dict[str, float], float]) -> None:
        """Start from totals saved by `totals` (on one rank only, so that they are counted once).

        `weights` may be one number for all metrics (checkpoints written before per-metric weights).
        """
        if not isinstance(weights, dict):
            weights = {n: float(weights) for n in sums}
        self.sums = {n: t.to(self.device, torch.float64).clone() for n, t in sums.items()}
        self.weights = {n: float(weights[n]) for n in sums}

    def reduce(self, backend: Backend) -> Reduced:
        """The weighted means over every rank, as Python numbers (nested lists for non-scalars)."""
        return means(*self.totals(backend))


def means(sums: Dict[str, torch.Tensor], weights: Dict[str, float]) -> Reduced:
    """sum / weight per metric, as Python numbers (nested lists for non-scalars)."""
    out: Reduced = {}
    for n, value in sums.items():
        value = value / weights[n]
        out[n] = value.item() if value.dim() == 0 else value.tolist()
    return out


def first_nonfinite(values: List[torch.Tensor]) -> Optional[int]:
    """Index of the first non-finite scalar in `values` (one host sync), or None."""
    if not values:
        return None
    bad = (~torch.isfinite(torch.stack(values))).nonzero()
    return int(bad[0].item()) if bad.numel() else None
