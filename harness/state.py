"""What the loop keeps between batches and in checkpoints: progress, the best validation, the checkpoint's
contents (every rank's RNG and unfinished gradients), and the training-metric totals."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from harness import checkpoint
from harness.config import ExperimentConfig
from harness.errors import HarnessError
from harness.metrics import MetricAccumulator, first_nonfinite
from harness.optimizer_step import OptimizerStep


@dataclass
class Progress:
    """Where training stands, in global units (the same on every rank); saved in checkpoints."""

    batches: int = 0
    records: int = 0
    epoch_index: int = 0
    batch_in_epoch: int = 0
    batches_per_epoch: int = 1
    loss_log_start: int = 0  # batch number before the first entry of loss_log
    # This rank's losses since the last report, on the device: the "loss" metric is summed from it at the
    # report (one stack instead of a kernel per batch), and a NaN is located in it.
    loss_log: List[torch.Tensor] = field(default_factory=list)

    @property
    def epoch(self) -> float:
        return self.batches / self.batches_per_epoch

    def losses_counted(self) -> None:
        """loss_log has gone into the training metrics: start the next window."""
        self.loss_log.clear()
        self.loss_log_start = self.batches

    def saved(self) -> Dict[str, int]:
        return {
            "batches": self.batches,
            "records": self.records,
            "epoch_index": self.epoch_index,
            "batch_in_epoch": self.batch_in_epoch,
        }


class BestValidation:
    """checkpoint_policy: after which validations to checkpoint (all, the best so far, none)."""

    def __init__(self, config: ExperimentConfig):
        self.policy = config.checkpoint_policy
        self.metric = config.searcher.metric
        self.smaller = config.searcher.smaller_is_better
        self.value: Optional[float] = None  # the best value of searcher.metric so far (kept in checkpoints)

    def checkpoint_after(self, metrics: Dict[str, Any]) -> bool:
        value = metrics.get(self.metric) if self.metric else None
        improved = isinstance(value, (int, float)) and (
            self.value is None or (value < self.value if self.smaller else value > self.value)
        )
        if improved:
            self.value = float(value)
        return self.policy == "all" or (self.policy == "best" and improved)


@dataclass
class CheckpointContext:
    """What a checkpoint needs from the loop; `save` is called on every rank at the same batch."""

    output_dir: str
    config: ExperimentConfig
    backend: Any
    model: torch.nn.Module
    optimizer: Any
    step: OptimizerStep
    train_metrics: MetricAccumulator
    progress: Progress
    best: BestValidation
    epoch_rng: Any = None
    model_dir: Optional[str] = None  # the model definition's folder, recorded for load_trial / harness export

    def save(self, validation_metrics: Dict[str, Any]) -> str:
        backend, progress = self.backend, self.progress
        # Every rank's RNG (now and at the start of this epoch), in mid aggregation window its accumulated
        # gradients (they differ by rank), and the partial training-metric window.
        rngs = backend.allgather_object(
            {
                "now": checkpoint.capture_rng(),
                "epoch_start": self.epoch_rng,
                "grads": self.step.local_gradients(),
            }
        )
        sums, weights = training_totals(self.train_metrics, progress, backend)
        bad = [n for n, t in sums.items() if not bool(torch.isfinite(t).all())]
        if bad:  # every rank has the same totals, so every rank stops here
            raise HarnessError(
                f"training metric '{bad[0]}' is not finite at batch {progress.batches}; not checkpointing"
            )
        path = None
        if backend.rank == 0:
            self.train_metrics.load(sums, weights)  # counted once, on rank 0, as after a resume
            cfg = self.config
            state = {
                "progress": progress.saved(),
                "seed": cfg.reproducibility.experiment_seed,
                "ranks": backend.size,
                "validation_metrics": validation_metrics,
                "best": self.best.value,
                "hparams": cfg.hyperparameters,
                "config": cfg.as_dict(),
                "model_dir": self.model_dir,
                "time": time.time(),
            }
            trainer = {"rng": rngs, "window": [sums, weights], "step": self.step.state_dict()}
            root = os.path.join(self.output_dir, "checkpoints")
            path = checkpoint.save(
                root, progress.batches, state, self.model.state_dict(), self.optimizer.state_dict(), trainer
            )
            storage = cfg.checkpoint_storage
            checkpoint.apply_retention(
                root,
                storage.save_trial_latest,
                storage.save_trial_best,
                cfg.searcher.metric,
                cfg.searcher.smaller_is_better,
            )
        return backend.broadcast_object(path)  # also a barrier: the checkpoint is complete for everyone


def resume_info(ckpt: checkpoint.Checkpoint) -> Dict[str, Any]:
    """The part of a checkpoint every rank needs (the weights travel by broadcast)."""
    return {
        "path": ckpt.path,
        "progress": ckpt.state["progress"],
        "seed": ckpt.state["seed"],
        "validation_metrics": ckpt.state["validation_metrics"],
        "best": ckpt.state.get("best"),
        "config": ckpt.state.get("config", {}),
        "rng": ckpt.trainer["rng"],
    }


def training_totals(
    acc: MetricAccumulator, progress: Progress, backend: Any
) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """The training metrics' sums and weights over all ranks (with the losses of loss_log); clears both.

    A non-finite loss stops every rank (they all see the same totals) naming the first bad batch anywhere.
    """
    acc.add_values("loss", progress.loss_log)
    sums, weights = acc.totals(backend)
    if "loss" in sums and not bool(torch.isfinite(sums["loss"]).all()):
        local = first_nonfinite(progress.loss_log)
        index = progress.loss_log_start + local + 1 if local is not None else sys.maxsize
        first = int(backend.allreduce_min(torch.tensor([index], dtype=torch.int64)).item())
        raise HarnessError(f"the loss is not finite (NaN or inf) at training batch {first}; stopping")
    progress.losses_counted()
    return sums, weights
