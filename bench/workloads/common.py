"""What every contender trains: the two workloads (model, optimizer, data) and the timing probe.

Every contender (the harness, the hand-written Horovod loop, torchrun + DDP, Lightning) imports this module,
so model, initialisation, data, split, batch sizes and optimizer are the same for all of them. The probe
measures from outside the training code, the same way in every contender, so the harness runs unmodified:

- a global optimizer step post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) counts
  optimizer steps and stamps the first step (launch-to-first-batch), the end of the warm-up and the last step
  (training throughput). Horovod's ``DistributedOptimizer``, DDP and Lightning all end in the wrapped
  optimizer's ``step``, so the hook fires once per global batch in all of them;
- the networks record ``train(False)`` (validation starts) and ``train(True)`` calls, which every contender
  makes through ``model.eval()`` / ``model.train()``;
- at exit each rank writes ``$BENCH_OUT/rank<r>.json`` with the stamps and its peak RSS (getrusage).

Without ``BENCH_OUT`` in the environment the probe does nothing, so the workloads also run by hand.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

SEED = 42
VAL_RECORDS = 360  # a fixed split of the 1797 digits: 360 validation, 1437 training records
VAL_BATCH = 256  # per rank


def harness_config(batches: int, report_every: int = 100, extra: str = "") -> str:
    """The harness's experiment config for a bench run (YAML text): `batches` training batches, a report
    every `report_every`, and SEED, so that the harness trains the same numbers as the hand-written loops
    (another seed is another trajectory: on the conv net, more of Adam's moments decay into denormal floats
    and each step is ~5% slower). `extra`: more top-level YAML lines."""
    return (
        f"searcher:\n  max_length: {{batches: {batches}}}\n"  # batches, not optimizer steps
        f"scheduling_unit: {report_every}\n"
        f"reproducibility:\n  experiment_seed: {SEED}\n" + extra
    )


@dataclass(frozen=True)
class Workload:
    name: str
    global_batch: int
    optimizer: str  # "adam" or "sgd"
    lr: float
    what: str


WORKLOADS: Dict[str, Workload] = {
    "conv": Workload(
        "conv", 64, "adam", 3e-3, "small CNN on the 8x8 digits, global batch 64 (compute-bound)"
    ),
    "mlp": Workload("mlp", 16, "sgd", 0.05, "tiny MLP 64-32-10, global batch 16 (overhead-bound)"),
}


class Probed(nn.Module):
    """Arms the probe at the first forward in training mode (steps before it, e.g. Horovod's optimizer-state
    broadcast, are not training batches) and records mode switches: ``eval()`` starts a validation."""

    def train(self, mode: bool = True) -> Probed:
        PROBE.mode_switch(mode)
        return super().train(mode)


class ConvNet(Probed):
    """The CNN of samples/digits (width 16)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not PROBE.armed:
            PROBE.armed = self.training
        return self.net(x)


class TinyMLP(Probed):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not PROBE.armed:
            PROBE.armed = self.training
        return self.net(x)


def build_model(workload: str) -> nn.Module:
    """The network; call it right after ``torch.manual_seed(SEED)`` so that every contender starts equal."""
    return ConvNet() if workload == "conv" else TinyMLP()


def build_optimizer(workload: str, model: nn.Module) -> torch.optim.Optimizer:
    w = WORKLOADS[workload]
    if w.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=w.lr)
    return torch.optim.SGD(model.parameters(), lr=w.lr)


_DATA: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


def datasets() -> Tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """(training, validation) TensorDatasets of scikit-learn's bundled digits, images as (1, 8, 8) floats."""
    global _DATA
    if _DATA is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        _DATA = images, torch.tensor(d.target, dtype=torch.int64)
    images, labels = _DATA
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val, train = order[:VAL_RECORDS], order[VAL_RECORDS:]
    return (
        torch.utils.data.TensorDataset(images[train], labels[train]),
        torch.utils.data.TensorDataset(images[val], labels[val]),
    )


def threads_per_rank(local_ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // local_ranks)


# ----------------------------------------------------------------------------------------------------------
# The probe.


def _env_rank() -> int:
    for v in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK"):
        if v in os.environ:
            return int(os.environ[v])
    return 0


class Probe:
    def __init__(self) -> None:
        self.out = os.environ.get("BENCH_OUT")
        self.warmup = int(os.environ.get("BENCH_WARMUP", "0"))
        self.armed = False
        self.steps = 0
        self.step_ends: List[float] = []  # perf_counter at the end of every step
        self._depth = 0  # Horovod's DistributedOptimizer.step calls the wrapped optimizer's step: count once
        self.first_step_wall: Optional[float] = None
        self.warm_t: Optional[float] = None
        self.last_t: Optional[float] = None
        self.val_start_wall: Optional[float] = None
        self.val_end_wall: Optional[float] = None  # set by contenders that know it (not the harness)
        self.train_mode_after_val_wall: Optional[float] = None
        self.extra: Dict[str, Any] = {}
        self.installed = False

    def install(self) -> None:
        if self.installed or not self.out:
            return
        self.installed = True
        register_optimizer_step_pre_hook(self._before_step)
        register_optimizer_step_post_hook(self._after_step)
        atexit.register(self.write)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._depth += 1

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._depth -= 1
        if self._depth or not self.armed:
            return
        self.steps += 1
        self.last_t = time.perf_counter()
        self.step_ends.append(self.last_t)
        if self.steps == 1:
            self.first_step_wall = time.time()
        if self.steps == self.warmup:
            self.warm_t = self.last_t

    def mode_switch(self, training: bool) -> None:
        if not self.installed:
            return
        now = time.time()
        if not training:
            self.val_start_wall = now
            self.train_mode_after_val_wall = None
        elif self.val_start_wall is not None and self.train_mode_after_val_wall is None:
            self.train_mode_after_val_wall = now

    def validation_done(self, metrics: Dict[str, float]) -> None:
        self.val_end_wall = time.time()
        self.extra["validation"] = metrics

    def write(self) -> None:
        if not self.out:
            return
        rank = _env_rank()
        timed = self.steps - self.warmup
        ends = self.step_ends[max(0, self.warmup - 1) :]
        step_ms = sorted((b - a) * 1e3 for a, b in zip(ends, ends[1:]))
        result = {
            "rank": rank,
            "pid": os.getpid(),
            "steps": self.steps,
            "warmup": self.warmup,
            "timed_steps": timed,
            "train_seconds": (self.last_t - self.warm_t) if self.warm_t and self.last_t else None,
            "step_ms_median": step_ms[len(step_ms) // 2] if step_ms else None,
            "step_ms_p90": step_ms[int(len(step_ms) * 0.9)] if step_ms else None,
            "step_ms_max": step_ms[-1] if step_ms else None,
            "first_step_wall": self.first_step_wall,
            "val_start_wall": self.val_start_wall,
            "val_end_wall": self.val_end_wall,
            "train_mode_after_val_wall": self.train_mode_after_val_wall,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "torch_threads": torch.get_num_threads(),
            **self.extra,
        }
        if os.environ.get("BENCH_STEP_TIMES"):  # every step's duration, for profiling (bench/README.md)
            result["step_ms"] = [(b - a) * 1e3 for a, b in zip(ends, ends[1:])]
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, f"rank{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        self.out = None  # once


PROBE = Probe()
