"""The training loop: the hand-written Horovod loop, plus the harness's duties (sharding, metrics, checks).

Read `train` top to bottom: set-up, then the epoch loop with its report and validation points.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from harness import building as build
from harness import checkpoint, resume, watchdog
from harness import trial as trial_api
from harness.adapters import TrialAdapter, make_adapter
from harness.config import ExperimentConfig
from harness.data import shard_training_loader
from harness.definition import ModelDefinition
from harness.distributed import under_launcher
from harness.errors import HarnessError, Interrupted, say
from harness.metrics import MetricAccumulator, first_nonfinite, means
from harness.optimizer_step import OptimizerStep
from harness.preemption import StopRequest, StopVotes
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
    watchdog.current().phase("set-up")  # from here stall_timeout applies (start-up had its own limit)
    device = build.pick_device(backend)
    is_chief = backend.rank == 0
    stop = StopRequest()
    if under_launcher():
        stop.watch_launchers()  # a rank whose launcher dies stops too, instead of training on as an orphan

    # Resume: rank 0 finds the checkpoint; its small state reaches every rank, the weights by broadcast.
    ckpt = checkpoint.prepare_output(output_dir, fresh, resume_from) if is_chief else None
    resumed = backend.broadcast_object(_resume_info(ckpt) if ckpt else None)
    seed = build.agree_on_seed(config.reproducibility.experiment_seed, backend, resumed)
    config.reproducibility.experiment_seed = seed
    hparams = config.hyperparameters
    config_dict = config.as_dict()
    changed = resume.check_config(resumed["config"], config_dict, resumed["path"]) if resumed else None
    trial_api._set_context(hparams, None, config_dict, seed)
    build.seed_everything(seed)
    if is_chief:
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_dict, f, sort_keys=False)

    trial = build.make_trial(model_def, hparams)
    adapter = make_adapter(trial)
    global_batch = build.global_batch_size(trial, model_def, hparams, backend.size)
    per_rank_batch = global_batch // backend.size

    # Data: downloaded once per machine, then every rank's loaders, sharded across ranks.
    data_dir = build.download_once_per_machine(
        model_def, config_dict, hparams, backend, config.download_timeout, stop
    )
    trial_api._set_context(hparams, data_dir)
    loaders = build.call_user(
        model_def.make_data_loaders, model_def, "make_data_loaders()", config_dict, hparams
    )
    train_loader, val_loader = build.check_loader_pair(loaders)
    train_loader, sampler = shard_training_loader(
        train_loader, per_rank_batch, backend.rank, backend.size, seed
    )
    val_loader = adapter.validation_loader(val_loader, backend.rank, backend.size)

    # Model, optimizer, LR scheduler: built on every rank from the same seed; rank 0's state is broadcast.
    model = build.build_model(trial, model_def, hparams).to(device)
    if resumed and is_chief:
        resume.check_model(model, ckpt.model, ckpt.path)  # before any state is loaded or broadcast
    optimizer = backend.wrap_optimizer(build.build_optimizer(trial, model_def, model, hparams), model)
    step = OptimizerStep(optimizer, build.build_lr_scheduler(trial, model_def, optimizer))
    if resumed:  # after the scheduler's creation, which sets the learning rate of its first step
        saved = backend.broadcast_object((ckpt.optimizer, ckpt.trainer.get("step", {})) if is_chief else None)
        optimizer.load_state_dict(saved[0])
        step.load_state_dict(saved[1])
        if is_chief:
            model.load_state_dict(ckpt.model)
    backend.broadcast_model(model)
    build.seed_everything(seed + backend.rank)  # per-rank randomness (dropout, augmentation) from here on

    progress = Progress(batches_per_epoch=len(train_loader))
    total = config.searcher.max_length.to_batches(progress.batches_per_epoch, global_batch)
    validate_every = _every(config.min_validation_period, progress, global_batch)
    checkpoint_every = _every(config.min_checkpoint_period, progress, global_batch)
    train_metrics = MetricAccumulator(device, adapter.training_source)
    best = _BestValidation(config)
    last_validation: Dict[str, Any] = {}
    rng_resume = None
    if resumed:
        for key, value in resumed["progress"].items():
            setattr(progress, key, value)
        progress.loss_log_start = progress.batches
        last_validation = resumed["validation_metrics"]
        best.value = resumed["best"]
        rng_resume = resumed["rng"][backend.rank] if backend.rank < len(resumed["rng"]) else None
        if is_chief:
            train_metrics.load(*ckpt.trainer["window"])
    reporter = Reporter(
        output_dir,
        enabled=is_chief,
        resume_at=progress.batches if resumed else None,
        progress_bar=progress_bar,
    )
    _announce(reporter, config, backend, device, global_batch, total, progress, resumed, adapter)
    if changed:
        reporter.log(changed)
    ckpt_ctx = _CheckpointContext(
        output_dir, config, backend, model, optimizer, step, train_metrics, progress, best
    )
    votes = StopVotes(backend, progress.batches)
    non_blocking = device.type == "cuda"
    watch = watchdog.current()
    watch.phase("training")

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
            watch.beat()
            where = f"training batch {progress.batches + 1}"
            batch, records = adapter.prepare(batch, device, where, non_blocking)

            step.zero_grad()
            loss, metrics = adapter.train_step(batch, model, progress.epoch_index, progress.batches, where)
            step.step(loss)

            # Harness duties: metrics stay on the device until the next report.
            progress.loss_log.append(loss.detach())
            if metrics:
                train_metrics.add(metrics)
            progress.batches += 1
            progress.batch_in_epoch += 1
            progress.records += records * backend.size
            reporter.advance(records * backend.size)

            done = progress.batches >= total
            if done or progress.batches % config.scheduling_unit == 0:
                _report_training(train_metrics, progress, reporter, backend, step)
                reporter.start_period(config.scheduling_unit, global_batch)
            best_so_far = abandoned = False
            if done or (validate_every and progress.batches % validate_every == 0):
                result = adapter.evaluate(model, val_loader, device, backend, stop)
                abandoned = result is None  # a stop request meanwhile: checkpoint and stop now
                if not abandoned:
                    last_validation = result
                    _check_searcher_metric(config, last_validation)
                    best_so_far = best.checkpoint_after(last_validation)
                    reporter.report(
                        "validation", progress.batches, progress.epoch, progress.records, last_validation
                    )
            stopping = votes.finish(vote, progress.batches) or abandoned
            periodic = checkpoint_every and progress.batches % checkpoint_every == 0
            if done or stopping or periodic or best_so_far:
                path = ckpt_ctx.save(last_validation)
                if stopping:
                    reporter.log(
                        f"stopped by {stop.signal_name or 'a stop request on another rank'} at batch "
                        f"{progress.batches}; checkpoint: {path}"
                    )
                    reporter.close()
                    if stop.exit_code:
                        raise Interrupted(f"stopped by {stop.signal_name} at batch {progress.batches}")
                    return last_validation
            if done:
                break
        else:
            progress.epoch_index += 1
            progress.batch_in_epoch = 0
            step.end_epoch()

    reporter.close()
    if is_chief:
        say(f"results: {os.path.abspath(reporter.path)}")
    return last_validation


def _announce(
    reporter: Reporter,
    config: ExperimentConfig,
    backend: Any,
    device: torch.device,
    global_batch: int,
    total: int,
    progress: Progress,
    resumed: Optional[Dict[str, Any]],
    adapter: TrialAdapter,
) -> None:
    """The run's first console lines: what trains where, and anything the user should know."""
    reporter.log(
        f"training on {device} with {backend.size} rank(s) ({backend.controller}), "
        f"global batch {global_batch}, {total} batches ({progress.batches_per_epoch} per epoch), "
        f"trial API {adapter.api}"
    )
    slots = getattr(config, "slots_per_trial", None)
    if slots is not None and slots != backend.size:
        reporter.log(
            f"note: the config's resources.slots_per_trial is {slots}, but the launcher started "
            f"{backend.size} rank(s); training on {backend.size} (the launcher decides)"
        )
    if resumed:
        reporter.log(
            f"resuming from {resumed['path']} at batch {progress.batches} (epoch {progress.epoch:.2f})"
        )
    if progress.batches >= total:
        reporter.log(f"already trained {progress.batches} of {total} batches; nothing to do")


class _BestValidation:
    """checkpoint_policy: after which validations to checkpoint (all, the best so far, none)."""

    def __init__(self, config: ExperimentConfig):
        self.policy = getattr(config, "checkpoint_policy", "none")
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
class _CheckpointContext:
    """What a checkpoint needs from the loop; `save` is called on every rank at the same batch."""

    output_dir: str
    config: ExperimentConfig
    backend: Any
    model: torch.nn.Module
    optimizer: Any
    step: OptimizerStep
    train_metrics: MetricAccumulator
    progress: Progress
    best: _BestValidation
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
                "best": self.best.value,
                "hparams": cfg.hyperparameters,
                "config": cfg.as_dict(),
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


def _resume_info(ckpt: checkpoint.Checkpoint) -> Dict[str, Any]:
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


def _every(length: Any, progress: Progress, global_batch: int) -> Optional[int]:
    return length.to_batches(progress.batches_per_epoch, global_batch) if length else None


# ----------------------------------------------------------------------------------------------------------
# The duties, out of the way of the loop.


def _report_training(
    acc: MetricAccumulator, progress: Progress, reporter: Reporter, backend: Any, step: OptimizerStep
) -> None:
    sums, weights = _training_totals(acc, progress, backend)
    metrics = means(sums, weights)
    lrs = step.learning_rates()  # the same on every rank: no reduction
    if lrs is not None:
        metrics["lr"] = lrs[0] if len(lrs) == 1 else lrs
    reporter.report("training", progress.batches, progress.epoch, progress.records, metrics)


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


def _check_searcher_metric(config: ExperimentConfig, metrics: Dict[str, Any]) -> None:
    name = config.searcher.metric
    if name is not None and name not in metrics:
        raise HarnessError(
            f"config key 'searcher.metric': '{name}' is not a validation metric "
            f"(have: {', '.join(sorted(metrics))})"
        )
