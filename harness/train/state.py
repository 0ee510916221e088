"""Run state with one owner: every piece the loop keeps between batches, and `RunState`, which saves all of
them into a checkpoint and restores all of them from one.

Each piece has `state_dict()` / `load_state_dict()`: `Progress`, `Validations`, `TrainingMetrics` (the
window since the last report), `DataOrder` (the sampler's position and the per-rank RNG), and the
`OptimizerStep` (LR scheduler, loss scaler, unfinished aggregation window). A checkpoint's layout is
defined here, in `RunState.save`, and read back here, in `RunState.restore`; output/checkpoint.py only
writes and verifies files.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from harness.config import ExperimentConfig
from harness.distributed.backend import Backend
from harness.errors import HarnessError, say
from harness.output import checkpoint
from harness.train import resume
from harness.train.metrics import MetricAccumulator, first_nonfinite, means
from harness.train.optimizer_step import OptimizerStep
from harness.train.report import Reduced
from harness.train.sharding import ResumableDistributedSampler


@dataclass
class Progress:
    """Where training stands, in global units (the same on every rank)."""

    batches: int = 0
    records: int = 0
    epoch_index: int = 0
    batch_in_epoch: int = 0
    batches_per_epoch: int = 1

    @property
    def epoch(self) -> float:
        return self.batches / self.batches_per_epoch

    def advance(self, records: int) -> None:
        """One global batch of `records` records (all ranks) trained."""
        self.batches += 1
        self.batch_in_epoch += 1
        self.records += records

    def end_epoch(self) -> None:
        self.epoch_index += 1
        self.batch_in_epoch = 0

    def state_dict(self) -> Dict[str, int]:
        return {
            "batches": self.batches,
            "records": self.records,
            "epoch_index": self.epoch_index,
            "batch_in_epoch": self.batch_in_epoch,
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.batches, self.records = state["batches"], state["records"]
        self.epoch_index, self.batch_in_epoch = state["epoch_index"], state["batch_in_epoch"]


class Validations:
    """The last validation's metrics and the best value of searcher.metric so far; `checkpoint_policy` says
    after which validations to checkpoint (all, those that improved the best, none)."""

    def __init__(self, config: ExperimentConfig):
        self.policy = config.checkpoint_policy
        self.metric = config.searcher.metric
        self.smaller = config.searcher.smaller_is_better
        self.last: Dict[str, Any] = {}
        self.best: Optional[float] = None

    def record(self, metrics: Dict[str, Any]) -> bool:
        """Take a validation's metrics; whether to checkpoint after it."""
        if self.metric is not None and self.metric not in metrics:
            raise HarnessError(
                f"config key 'searcher.metric': '{self.metric}' is not a validation metric "
                f"(have: {', '.join(sorted(metrics))})"
            )
        self.last = metrics
        value = metrics.get(self.metric) if self.metric else None
        improved = isinstance(value, (int, float)) and (
            self.best is None or (value < self.best if self.smaller else value > self.best)
        )
        if improved:
            self.best = float(value)  # type: ignore[arg-type]  # a number: `improved` says so
        return self.policy == "all" or (self.policy == "best" and improved)

    def state_dict(self) -> Dict[str, Any]:
        return {"validation_metrics": self.last, "best": self.best}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last, self.best = state["validation_metrics"], state.get("best")


class TrainingMetrics:
    """This rank's training metrics since the last report, kept on the device until the report.

    The losses go into a list (one stack and sum at the report instead of a kernel per batch; a NaN is found
    in it by batch); other metrics into a MetricAccumulator.
    """

    def __init__(self, device: torch.device, where: str, batches: int = 0):
        self.acc = MetricAccumulator(device, where)
        self.losses: List[torch.Tensor] = []
        self.start = batches  # the batch number before the first entry of `losses`

    def add(self, loss: Optional[torch.Tensor], metrics: Optional[Dict[str, Any]]) -> None:
        if loss is not None:  # None: a trial whose train_batch returned metrics without "loss"
            loss = loss.detach()
            if loss.dtype is not torch.float32:  # (float() of a float32 loss is a call per batch for nothing)
                loss = loss.float()
            self.losses.append(loss)
        if metrics:
            self.acc.add(metrics)

    def totals(self, backend: Backend, batches: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """Sums and weights over every rank (a collective), and a new window from batch `batches`.

        A non-finite loss stops every rank (they all see the same totals), naming the first bad batch of any
        rank.
        """
        return self.start_totals(backend, batches)()

    def start_totals(
        self, backend: Backend, batches: int
    ) -> Callable[[], Tuple[Dict[str, torch.Tensor], Dict[str, float]]]:
        """`totals` with its allreduce started; what it returns waits for it (and checks the loss). The next
        window starts now."""
        losses, start = self.losses, self.start
        self.acc.add_values("loss", losses)
        wait = self.acc.start_totals(backend)
        self.losses, self.start = [], batches

        def finish() -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
            sums, weights = wait()
            if "loss" in sums and not bool(torch.isfinite(sums["loss"]).all()):
                local = first_nonfinite(losses)
                index = start + local + 1 if local is not None else sys.maxsize
                first = int(backend.allreduce_min(torch.tensor([index], dtype=torch.int64)).item())
                raise HarnessError(f"the loss is not finite (NaN or inf) at training batch {first}; stopping")
            return sums, weights

        return finish

    def start_report(self, backend: Backend, batches: int) -> Callable[[], Reduced]:
        """The window's means over every rank, their allreduce started now (it overlaps what the caller does
        next); what it returns waits for them. The next window starts now."""
        finish = self.start_totals(backend, batches)
        return lambda: means(*finish())

    def report(self, backend: Backend, batches: int) -> Reduced:
        """The window's means over every rank; the next window starts."""
        return self.start_report(backend, batches)()

    def state_dict(self, backend: Backend, batches: int) -> List[Any]:
        """The unreported window, reduced over the ranks (a collective), kept on rank 0 as after a resume:
        it is counted once at the next report."""
        sums, weights = self.totals(backend, batches)
        bad = [n for n, t in sums.items() if not bool(torch.isfinite(t).all())]
        if bad:  # every rank has the same totals, so every rank stops here
            raise HarnessError(
                f"training metric '{bad[0]}' is not finite at batch {batches}; not checkpointing"
            )
        if backend.rank == 0:
            self.acc.load(sums, weights)
        return [sums, weights]

    def load_state_dict(
        self, window: Optional[List[Any]], backend: Backend, batches: int, saved_ranks: Optional[int] = None
    ) -> None:
        """`saved_ranks`: the number of ranks that reduced `window`. Each rank adds one entry per batch, so
        a window saved by another number of ranks is rescaled to count each of its batches as this run's
        batches count (else the report that spans an elastic restart would weigh the batches of the larger
        world more: seen as a mean label 4.4928 instead of 4.5203 over 7 batches at 1 rank and 3 at 2)."""
        self.start = batches
        if window is not None and backend.rank == 0:
            sums, weights = window
            if isinstance(saved_ranks, int) and saved_ranks > 0 and saved_ranks != backend.size:
                scale = backend.size / saved_ranks
                sums = {n: t * scale for n, t in sums.items()}
                weights = (
                    {n: w * scale for n, w in weights.items()}
                    if isinstance(weights, dict)
                    else weights * scale
                )
            self.acc.load(sums, weights)


class DataOrder:
    """Which records this rank trains next: the sampler's permutation (a function of seed and epoch), the
    position in the epoch, and the RNG that a DataLoader's `iter()` draws from (its workers' seeds).

    The RNG is captured at each epoch start, so that a resumed run draws what the interrupted one drew.
    """

    def __init__(self, loader: Any, sampler: ResumableDistributedSampler, per_rank_batch: int):
        self.loader, self.sampler, self.per_rank_batch = loader, sampler, per_rank_batch
        self.epoch_rng: Optional[Dict[str, Any]] = None
        self._resume: Optional[Dict[str, Any]] = None  # this rank's RNG states from a checkpoint

    def epoch(self, progress: Progress) -> Iterator[Any]:
        """The batches left in the current epoch."""
        self.sampler.set_epoch(progress.epoch_index)
        self.sampler.skip = progress.batch_in_epoch * self.per_rank_batch  # mid-epoch: what was trained
        if self._resume is not None:
            checkpoint.restore_rng(self._resume["epoch_start"])  # so that iter() draws what it drew before
        self.epoch_rng = checkpoint.capture_rng(torch_only=True)
        batches = iter(self.loader)
        if self._resume is not None:
            checkpoint.restore_rng(self._resume["now"])
            self._resume = None
        return batches

    def state_dict(self) -> Dict[str, Any]:
        return {"now": checkpoint.capture_rng(), "epoch_start": self.epoch_rng}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._resume = state


@dataclass
class Start:
    """How a run starts: from scratch or from a checkpoint. Every rank has `resumed` (the checkpoint's small
    part); rank 0 also has the checkpoint's tensors and the plan for the output directory."""

    resumed: Optional[Dict[str, Any]]
    ckpt: Optional[checkpoint.Checkpoint] = None
    plan: Optional[checkpoint.OutputPlan] = None

    def begin(self) -> None:
        """Set-up succeeded: rank 0 moves an earlier run in OUTPUT aside now (not before)."""
        if self.plan is not None:
            self.plan.start()


def find_start(output_dir: str, fresh: bool, resume_from: Optional[str], backend: Backend) -> Start:
    """Rank 0 finds the checkpoint to resume from (if any); its small part reaches every rank."""
    plan = checkpoint.prepare_output(output_dir, fresh, resume_from) if backend.rank == 0 else None
    ckpt = plan.ckpt if plan else None
    small = None
    if ckpt is not None:
        small = {
            "path": ckpt.path,
            "progress": ckpt.state["progress"],
            "seed": ckpt.state["seed"],
            "validation_metrics": ckpt.state["validation_metrics"],
            "best": ckpt.state.get("best"),
            "config": ckpt.state.get("config", {}),
            "rng": ckpt.trainer["rng"],
            "ranks": ckpt.state.get("ranks"),
        }
    return Start(backend.broadcast_object(small), ckpt, plan)


@dataclass
class RunState:
    """Everything a checkpoint holds; `save` and `restore` are called on every rank at the same batch."""

    config: ExperimentConfig
    backend: Backend
    model: torch.nn.Module
    optimizer: Any  # the backend's wrapper of the trial's optimizer
    step: OptimizerStep
    data: DataOrder
    metrics: TrainingMetrics
    progress: Progress
    validations: Validations
    model_dir: Optional[str] = None  # the model definition's folder, for load_trial / harness export
    model_files: Optional[Dict[str, str]] = None  # sha256 of its .py files: which code made the weights

    def restore(self, start: Start) -> None:
        """Resume: every piece from the checkpoint (rank 0 reads it; the others receive it)."""
        resumed, backend = start.resumed, self.backend
        if resumed is None:
            return
        ckpt = start.ckpt
        if ckpt is not None:  # rank 0: the weights must fit before any state is loaded or sent
            resume.check_model(self.model, ckpt.model, ckpt.path)
        sent = backend.broadcast_object(
            (ckpt.optimizer, ckpt.trainer.get("step", {})) if ckpt is not None else None
        )
        assert sent is not None, "rank 0 holds the checkpoint"
        optimizer, step = sent
        self.optimizer.load_state_dict(optimizer)
        mine = resumed["rng"][backend.rank] if backend.rank < len(resumed["rng"]) else None
        self.step.load_state_dict(step, (mine or {}).get("grads"))
        if ckpt is not None:
            self.model.load_state_dict(ckpt.model)
        self.progress.load_state_dict(resumed["progress"])
        self.validations.load_state_dict(resumed)
        window = ckpt.trainer["window"] if ckpt else None
        self.metrics.load_state_dict(window, backend, self.progress.batches, resumed.get("ranks"))
        if mine is not None:  # a run on more ranks than the checkpoint's: the new ranks start their RNG anew
            self.data.load_state_dict(mine)
        if backend.rank == 0:
            line = other_ranks(resumed.get("ranks"), backend.size, self.data.per_rank_batch * backend.size)
            if line:
                say(line)

    def save(self, output_dir: str) -> str:
        """Checkpoint OUTPUT/checkpoints/<batches> (rank 0 writes it); returns its folder on every rank."""
        backend, progress, cfg = self.backend, self.progress, self.config
        # Every rank's RNG (now and at this epoch's start) and, in mid aggregation window, its gradients.
        rngs = backend.allgather_object({**self.data.state_dict(), "grads": self.step.local_gradients()})
        self.step.prepare_checkpoint()  # what the step gathers from every rank (the context API's reducers)
        window = self.metrics.state_dict(backend, progress.batches)
        path = None
        if backend.rank == 0:
            state = {
                "progress": progress.state_dict(),
                "seed": cfg.reproducibility.experiment_seed,
                "ranks": backend.size,
                **self.validations.state_dict(),
                "hparams": cfg.hyperparameters,
                "config": cfg.as_dict(),
                "model_dir": self.model_dir,
                "model_files": self.model_files,
                "time": time.time(),
            }
            trainer = {"rng": rngs, "window": window, "step": self.step.state_dict()}
            root = os.path.join(output_dir, "checkpoints")
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
        path = backend.broadcast_object(path)  # also a barrier: the checkpoint is complete for everyone
        assert path is not None, "rank 0 wrote it"
        return path


def other_ranks(saved: Optional[int], now: int, global_batch: int) -> Optional[str]:
    """The line that says a resume runs at another number of ranks than the checkpoint's (an elastic
    restart, or a launcher's other -np): the global batch and the position in the data stay; each rank's
    share of the batch changes. None when the numbers are equal (or the checkpoint predates the count)."""
    if not isinstance(saved, int) or saved == now:
        return None
    return (
        f"resuming at another number of ranks: the checkpoint was written by {saved} rank"
        f"{'s' if saved != 1 else ''}, this run has {now}; the global batch stays {global_batch} "
        f"({global_batch // now} records per rank, was {global_batch // saved})"
    )
