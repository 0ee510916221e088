"""The training loop: the hand-written Horovod loop, plus the harness's duties (sharding, metrics, checks).

Read `train` top to bottom: set-up, then the epoch loop with its report and validation points.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from harness import checkpoint
from harness import trial as trial_api
from harness.config import ExperimentConfig
from harness.data import batch_records, batch_to_device, shard_training_loader, shard_validation_loader
from harness.definition import ModelDefinition, positional_arity, user_frame
from harness.errors import HarnessError, say
from harness.metrics import MetricAccumulator, first_nonfinite, means
from harness.preemption import StopRequest
from harness.report import Reporter


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


def train(
    model_def: ModelDefinition,
    config: ExperimentConfig,
    output_dir: str,
    backend: Any,
    fresh: bool = False,
    resume_from: Optional[str] = None,
    progress_bar: bool = False,
) -> Dict[str, Any]:
    """Train the trial as `config` says, resuming from a checkpoint in `output_dir` if there is one."""
    device = _pick_device(backend)
    is_chief = backend.rank == 0
    stop = StopRequest()

    # Resume: rank 0 finds the checkpoint; its small state reaches every rank, the weights by broadcast.
    ckpt = checkpoint.prepare_output(output_dir, fresh, resume_from) if is_chief else None
    resumed = backend.broadcast_object(_resume_info(ckpt) if ckpt else None)
    config.reproducibility.experiment_seed = seed = _agree_on_seed(config, backend, resumed)
    hparams = config.hyperparameters
    config_dict = config.as_dict()
    trial_api._set_context(hparams, None)
    _seed_everything(seed)
    if is_chief:
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_dict, f, sort_keys=False)

    trial = _make_trial(model_def, hparams)
    global_batch = _call_user(trial.batch_size, model_def, "batch_size()")
    per_rank_batch = _per_rank_batch(global_batch, backend.size)

    # Data: downloaded once per machine, then every rank's loaders, sharded across ranks.
    data_dir = _download_once_per_machine(model_def, config_dict, hparams, backend)
    trial_api._set_context(hparams, data_dir)
    loaders = _call_user(model_def.make_data_loaders, model_def, "make_data_loaders()", config_dict, hparams)
    train_loader, val_loader = _check_loader_pair(loaders)
    train_loader, sampler = shard_training_loader(
        train_loader, per_rank_batch, backend.rank, backend.size, seed
    )
    val_loader = shard_validation_loader(val_loader, backend.rank, backend.size)

    # Model and optimizer: built on every rank from the same seed; rank 0's state is broadcast.
    model = _build_model(trial, model_def, hparams).to(device)
    optimizer = backend.wrap_optimizer(_build_optimizer(trial, model_def, model, hparams), model)
    if resumed:
        if is_chief:
            model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(backend.broadcast_object(ckpt.optimizer if is_chief else None))
    backend.broadcast_model(model)
    _seed_everything(seed + backend.rank)  # per-rank randomness (dropout, augmentation) from here on

    progress = Progress(batches_per_epoch=len(train_loader))
    total = config.searcher.max_length.to_batches(progress.batches_per_epoch, global_batch)
    validate_every = _every(config.min_validation_period, progress, global_batch)
    checkpoint_every = _every(config.min_checkpoint_period, progress, global_batch)
    train_metrics = MetricAccumulator(device, "losses()/training_metrics()")
    last_validation: Dict[str, Any] = {}
    rng_resume = None
    if resumed:
        for key, value in resumed["progress"].items():
            setattr(progress, key, value)
        progress.loss_log_start = progress.batches
        last_validation = resumed["validation_metrics"]
        rng_resume = resumed["rng"][backend.rank] if backend.rank < len(resumed["rng"]) else None
        if is_chief:
            train_metrics.load(*ckpt.trainer["window"])
    reporter = Reporter(
        output_dir,
        enabled=is_chief,
        resume_at=progress.batches if resumed else None,
        progress_bar=progress_bar,
    )
    reporter.log(
        f"training on {device} with {backend.size} rank(s) ({backend.controller}), "
        f"global batch {global_batch}, {total} batches ({progress.batches_per_epoch} per epoch)"
    )
    if resumed:
        reporter.log(
            f"resuming from {resumed['path']} at batch {progress.batches} (epoch {progress.epoch:.2f})"
        )
    ckpt_ctx = _CheckpointContext(output_dir, config, backend, model, optimizer, train_metrics, progress)
    votes = _StopVotes(backend, progress.batches)
    non_blocking = device.type == "cuda"
    # Other training metrics than the loss cost an accumulation per batch: only when there are any.
    extra_metrics = type(trial).training_metrics is not trial_api.PyTorchTrial.training_metrics
    if progress.batches >= total:
        reporter.log(f"already trained {progress.batches} of {total} batches; nothing to do")

    model.train()
    while progress.batches < total:
        sampler.set_epoch(progress.epoch_index)
        sampler.skip = progress.batch_in_epoch * per_rank_batch  # mid-epoch resume: skip what was trained
        if rng_resume is not None:
            checkpoint.restore_rng(rng_resume["epoch_start"])  # so that iter() draws what it drew before
        ckpt_ctx.epoch_rng = checkpoint.capture_rng(torch_only=True)
        batches = iter(train_loader)
        if rng_resume is not None:
            checkpoint.restore_rng(rng_resume["now"])
            rng_resume = None
        reporter.start_period(
            config.scheduling_unit - progress.batches % config.scheduling_unit, global_batch
        )
        for batch in batches:
            vote = votes.start(progress.batches, stop.requested)  # settled after the step; overlaps it
            where = f"training batch {progress.batches + 1}"
            inputs, labels = batch_to_device(batch, device, where, non_blocking)

            optimizer.zero_grad()
            predictions = model(inputs)
            losses = trial.losses(predictions, labels)
            loss = _loss_tensor(losses, where)
            loss.backward()
            optimizer.step()

            # Harness duties: metrics stay on the device until the next report.
            progress.loss_log.append(loss.detach())
            if extra_metrics or isinstance(losses, dict):
                with torch.no_grad():
                    extra = trial.training_metrics(predictions, labels, losses) if extra_metrics else {}
                    train_metrics.add({**(extra or {}), **_other_losses(losses)})
            records = batch_records(inputs, labels, where) * backend.size
            progress.batches += 1
            progress.batch_in_epoch += 1
            progress.records += records
            reporter.advance(records)

            done = progress.batches >= total
            if done or progress.batches % config.scheduling_unit == 0:
                _report_training(train_metrics, progress, reporter, backend)
                reporter.start_period(config.scheduling_unit, global_batch)
            if done or (validate_every and progress.batches % validate_every == 0):
                last_validation = validate(trial, model, val_loader, device, backend)
                _check_searcher_metric(config, last_validation)
                reporter.report(
                    "validation", progress.batches, progress.epoch, progress.records, last_validation
                )
            stopping = votes.finish(vote, progress.batches)
            if done or stopping or (checkpoint_every and progress.batches % checkpoint_every == 0):
                path = ckpt_ctx.save(last_validation)
                if stopping:
                    reporter.log(
                        f"stopped by {stop.signal_name or 'a signal on another rank'} at batch "
                        f"{progress.batches}; checkpoint: {path}"
                    )
                    reporter.close()
                    return last_validation
            if done:
                break
        else:
            progress.epoch_index += 1
            progress.batch_in_epoch = 0

    reporter.close()
    if is_chief:
        say(f"results: {os.path.abspath(reporter.path)}")
    return last_validation


def validate(
    trial: Any, model: torch.nn.Module, loader: Any, device: torch.device, backend: Any
) -> Dict[str, Any]:
    """Exact validation: each batch weighted by its records, summed over all ranks, divided by the total."""
    metrics = MetricAccumulator(device, "validation_metrics()")
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            where = f"validation batch {i + 1} of rank {backend.rank}"
            inputs, labels = batch_to_device(batch, device, where)
            predictions = model(inputs)
            losses = trial.losses(predictions, labels)
            metrics.add(
                trial.validation_metrics(predictions, labels, losses),
                weight=batch_records(inputs, labels, where),
            )
    model.train()
    return metrics.reduce(backend)


class _StopVotes:
    """Agreeing on a stop (SIGTERM/SIGUSR1 reach ranks at different times; all must stop at one batch).

    A vote is a two-number allreduce (stop?, proposed interval) that overlaps a batch. Voting at every batch
    would cost a collective per batch, which shows on fast steps; instead each vote also fixes the batch of
    the next one, so that votes are about VOTE_SECONDS apart (every batch once batches take longer).
    """

    VOTE_SECONDS = 0.05

    def __init__(self, backend: Any, batches: int):
        self.backend = backend
        self.next_at = batches + 1  # global batch number that carries the next vote
        self.last = (batches, time.perf_counter())  # (batches done, time) at the last vote's start

    def start(self, batches: int, stop: bool) -> Any:
        """Start a vote if batch `batches + 1` carries one (None otherwise)."""
        if batches + 1 < self.next_at:
            return None
        now, (before, then) = time.perf_counter(), self.last
        self.last = (batches, now)
        interval = 1  # until a batch has been timed
        if batches > before:
            step_s = (now - then) / (batches - before)
            interval = int(min(1000, max(1, self.VOTE_SECONDS / max(step_s, 1e-6))))
        return self.backend.start_vote(stop, interval)

    def finish(self, handle: Any, batches: int) -> bool:
        """After batch `batches`: whether every rank stops here."""
        if handle is None:
            return False
        stopping, interval = self.backend.finish_vote(handle)
        self.next_at = batches + interval
        return stopping


@dataclass
class _CheckpointContext:
    """What a checkpoint needs from the loop; `save` is called on every rank at the same batch."""

    output_dir: str
    config: ExperimentConfig
    backend: Any
    model: torch.nn.Module
    optimizer: Any
    train_metrics: MetricAccumulator
    progress: Progress
    epoch_rng: Any = None

    def save(self, validation_metrics: Dict[str, Any]) -> str:
        backend, progress = self.backend, self.progress
        # Every rank's RNG (now and at the start of this epoch) and the partial training-metric window.
        rngs = backend.allgather_object({"now": checkpoint.capture_rng(), "epoch_start": self.epoch_rng})
        sums, weights = _training_totals(self.train_metrics, progress, backend)
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
                "hparams": cfg.hyperparameters,
                "config": cfg.as_dict(),
                "time": time.time(),
            }
            trainer = {"rng": rngs, "window": [sums, weights]}
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


def _resume_info(ckpt: checkpoint.Checkpoint) -> Dict[str, Any]:
    """The part of a checkpoint every rank needs (the weights travel by broadcast)."""
    return {
        "path": ckpt.path,
        "progress": ckpt.state["progress"],
        "seed": ckpt.state["seed"],
        "validation_metrics": ckpt.state["validation_metrics"],
        "rng": ckpt.trainer["rng"],
    }


def _every(length: Any, progress: Progress, global_batch: int) -> Optional[int]:
    return length.to_batches(progress.batches_per_epoch, global_batch) if length else None


# ----------------------------------------------------------------------------------------------------------
# The duties, out of the way of the loop.


def _report_training(acc: MetricAccumulator, progress: Progress, reporter: Reporter, backend: Any) -> None:
    sums, weights = _training_totals(acc, progress, backend)
    reporter.report("training", progress.batches, progress.epoch, progress.records, means(sums, weights))


def _training_totals(
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


def _loss_tensor(losses: Any, where: str) -> torch.Tensor:
    """The tensor to minimise: `losses` itself or its "loss" entry; it must be a scalar."""
    if type(losses) is torch.Tensor and losses.dim() == 0:
        return losses  # the common case, checked first
    loss = losses
    if isinstance(losses, dict):
        if "loss" not in losses:
            raise HarnessError(
                f"losses() returned a dict without the key 'loss' (keys: {', '.join(map(str, losses))})"
            )
        loss = losses["loss"]
    if not isinstance(loss, torch.Tensor):
        raise HarnessError(f"losses() returned a {type(loss).__name__} at {where}; expected a scalar tensor")
    if loss.numel() != 1:
        raise HarnessError(
            f"losses() returned a loss of shape {tuple(loss.shape)} at {where}; "
            "expected a scalar (reduce it, e.g. with .mean())"
        )
    return loss if loss.dim() == 0 else loss.reshape(())  # a reshape would add an autograd node


def _other_losses(losses: Any) -> Dict[str, Any]:
    """The entries of a dict of losses besides "loss" (which is counted from loss_log): training metrics."""
    if isinstance(losses, dict):
        return {k: v for k, v in losses.items() if k != "loss"}
    return {}


def _check_searcher_metric(config: ExperimentConfig, metrics: Dict[str, Any]) -> None:
    name = config.searcher.metric
    if name is not None and name not in metrics:
        raise HarnessError(
            f"config key 'searcher.metric': '{name}' is not a validation metric "
            f"(have: {', '.join(sorted(metrics))})"
        )


def _pick_device(backend: Any) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(backend.local_rank)
        return torch.device("cuda", backend.local_rank)
    return torch.device("cpu")


def _agree_on_seed(config: ExperimentConfig, backend: Any, resumed: Optional[Dict[str, Any]]) -> int:
    seed = config.reproducibility.experiment_seed
    if seed is None and resumed:
        seed = resumed["seed"]  # a drawn seed is kept across restarts
    if seed is None:
        seed = backend.broadcast_object(random.SystemRandom().randrange(2**31) if backend.rank == 0 else None)
    return seed


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _per_rank_batch(global_batch: Any, size: int) -> int:
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch <= 0:
        raise HarnessError(f"batch_size() returned {global_batch!r}; expected a positive integer")
    if global_batch % size:
        raise HarnessError(
            f"batch_size() is {global_batch}, not divisible by the {size} ranks "
            "(it is the global batch; each rank takes batch_size() / ranks)"
        )
    return global_batch // size


def _call_user(fn: Any, model_def: ModelDefinition, what: str, *args: Any) -> Any:
    """Call user code that runs once; name it in the error if it raises."""
    try:
        return fn(*args)
    except HarnessError:
        raise
    except Exception as e:  # noqa: BLE001
        where = user_frame(e.__traceback__, model_def.directory)
        raise HarnessError(
            f"{what} raised {type(e).__name__}: {e}" + (f" (at {where})" if where else "")
        ) from e


def _make_trial(model_def: ModelDefinition, hparams: Dict[str, Any]) -> Any:
    cls = model_def.trial_class
    takes_hparams = cls.__init__ is not object.__init__ and positional_arity(cls.__init__) > 1
    args = (hparams,) if takes_hparams else ()
    return _call_user(cls, model_def, f"{cls.__name__}()", *args)


def _build_model(trial: Any, model_def: ModelDefinition, hparams: Dict[str, Any]) -> torch.nn.Module:
    args = (hparams,) if positional_arity(trial.build_model) >= 1 else ()
    model = _call_user(trial.build_model, model_def, "build_model()", *args)
    if not isinstance(model, torch.nn.Module):
        raise HarnessError(f"build_model() returned a {type(model).__name__}; expected a torch.nn.Module")
    return model


def _build_optimizer(
    trial: Any, model_def: ModelDefinition, model: torch.nn.Module, hparams: Dict[str, Any]
) -> Any:
    args = (model, hparams) if positional_arity(trial.optimizer) >= 2 else (model,)
    opt = _call_user(trial.optimizer, model_def, "optimizer()", *args)
    if not isinstance(opt, torch.optim.Optimizer):
        raise HarnessError(f"optimizer() returned a {type(opt).__name__}; expected a torch.optim.Optimizer")
    return opt


def _check_loader_pair(loaders: Any) -> Tuple[Any, Any]:
    if not isinstance(loaders, (tuple, list)) or len(loaders) != 2:
        raise HarnessError(
            f"make_data_loaders() returned a {type(loaders).__name__}; expected a pair (training, validation)"
        )
    return loaders[0], loaders[1]


def _download_once_per_machine(
    model_def: ModelDefinition, config_dict: Dict[str, Any], hparams: Dict[str, Any], backend: Any
) -> Optional[str]:
    """Local rank 0 of each machine runs download_data; the exchange below is everyone's barrier.

    Each rank contributes (host, outcome); an error anywhere ends every rank with that error, so no rank
    is left waiting for a download that will never come.
    """
    if model_def.download_data is None:
        return None
    outcome: Optional[Tuple[str, str]] = None
    if backend.local_rank == 0:
        try:
            path = _call_user(model_def.download_data, model_def, "download_data()", config_dict, hparams)
            if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
                raise HarnessError(f"download_data() returned {path!r}, which is not an existing directory")
            outcome = ("ok", os.path.abspath(path))
        except HarnessError as e:
            outcome = ("error", str(e))
    host = socket.gethostname()
    everyone = backend.allgather_object((host, outcome))
    for _, theirs in everyone:
        if theirs is not None and theirs[0] == "error":
            raise HarnessError(theirs[1])
    mine = [o for h, o in everyone if h == host and o is not None]
    if not mine:
        raise HarnessError(f"no rank with local rank 0 ran download_data() on {host}")
    return mine[0][1]
