"""The training loop: the hand-written Horovod loop, plus the harness's duties (sharding, metrics, checks).

Read `train` top to bottom: set-up, then the epoch loop with its report and validation points.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from harness import building as build
from harness import checkpoint, optimizations, resume, watchdog
from harness import search_trial as search
from harness import trial as trial_api
from harness.adapters import TrialAdapter, make_adapter
from harness.config import ExperimentConfig
from harness.data import shard_training_loader
from harness.definition import ModelDefinition
from harness.distributed import under_launcher
from harness.errors import HarnessError, Interrupted, say
from harness.metrics import MetricAccumulator, means
from harness.optimizer_step import OptimizerStep
from harness.preemption import StopRequest, StopVotes
from harness.report import Reporter
from harness.state import BestValidation, CheckpointContext, Progress, resume_info, training_totals
from harness.yaml_load import dump_yaml


def train(
    model_def: ModelDefinition,
    config: ExperimentConfig,
    output_dir: str,
    backend: Any,
    fresh: bool = False,
    resume_from: Optional[str] = None,
    progress_bar: bool = False,
    search_trial: Optional[str] = None,
) -> Dict[str, Any]:
    """Train the trial as `config` says, resuming from a checkpoint in `output_dir` if there is one."""
    watchdog.current().phase("set-up")  # from here stall_timeout applies (start-up had its own limit)
    device = build.pick_device(backend)
    options = config.training_options
    optimizations.check_device(options, device)
    is_chief = backend.rank == 0
    stop = StopRequest()
    if under_launcher():
        stop.watch_launchers()  # a rank whose launcher dies stops too, instead of training on as an orphan

    # Resume: rank 0 finds the checkpoint; its small state reaches every rank, the weights by broadcast.
    plan = checkpoint.prepare_output(output_dir, fresh, resume_from) if is_chief else None
    ckpt = plan.ckpt if plan else None
    resumed = backend.broadcast_object(resume_info(ckpt) if ckpt else None)
    seed = build.agree_on_seed(config.reproducibility.experiment_seed, backend, resumed)
    config.reproducibility.experiment_seed = seed
    hparams = config.hyperparameters
    config_dict = config.as_dict()
    changed = resume.check_config(resumed["config"], config_dict, resumed["path"]) if resumed else None
    trial_api._set_context(hparams, None, config_dict, seed)
    build.seed_everything(seed)

    trial = build.make_trial(model_def, hparams)
    adapter = make_adapter(trial)
    global_batch = build.global_batch_size(trial, model_def, hparams, backend.size)
    per_rank_batch = global_batch // backend.size

    # Data: downloaded once per machine, then every rank's loaders, sharded across ranks.
    train_loader, val_loader = build.make_loaders(
        model_def, config_dict, hparams, backend, config.download_timeout, stop
    )
    train_loader, sampler = shard_training_loader(
        train_loader, per_rank_batch, backend.rank, backend.size, seed
    )
    if val_loader is not None:  # None: no validation at all
        val_loader = adapter.validation_loader(val_loader, backend.rank, backend.size)
    elif config.searcher.metric:
        raise HarnessError(
            f"config key 'searcher.metric' names '{config.searcher.metric}', but make_data_loaders() "
            "returned no validation loader (None); remove searcher.metric or return one"
        )

    # Model, optimizer, LR scheduler: built on every rank from the same seed; rank 0's state is broadcast.
    model = build.build_model(trial, model_def, hparams).to(device)
    if resumed and is_chief:
        resume.check_model(model, ckpt.model, ckpt.path)  # before any state is loaded or broadcast
    optimizer = backend.wrap_optimizer(
        build.build_optimizer(trial, model_def, model, hparams), model, options
    )
    step = OptimizerStep(optimizer, build.build_lr_scheduler(trial, model_def, optimizer), options, device)
    if resumed:  # after the scheduler's creation, which sets the learning rate of its first step
        saved = backend.broadcast_object((ckpt.optimizer, ckpt.trainer.get("step", {})) if is_chief else None)
        optimizer.load_state_dict(saved[0])
        mine = resumed["rng"][backend.rank] if backend.rank < len(resumed["rng"]) else {}
        step.load_state_dict(saved[1], mine.get("grads"))
        if is_chief:
            model.load_state_dict(ckpt.model)
    backend.broadcast_model(model)
    build.seed_everything(seed + backend.rank)  # per-rank randomness (dropout, augmentation) from here on

    progress = Progress(batches_per_epoch=len(train_loader))
    total = config.searcher.max_length.to_batches(progress.batches_per_epoch, global_batch)
    validate_every = _every(config.min_validation_period, progress, global_batch)
    checkpoint_every = _every(config.min_checkpoint_period, progress, global_batch)
    searcher = search.connect(search_trial, backend, total)  # in a search: reports, may stop early
    train_metrics = MetricAccumulator(device, adapter.training_source)
    best = BestValidation(config)
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
    if is_chief:  # set-up succeeded: an earlier run in OUTPUT is moved aside only now
        plan.start()
        with open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            dump_yaml(config_dict, f)
    reporter = Reporter(
        output_dir,
        enabled=is_chief,
        resume_at=progress.batches if resumed else None,
        progress_bar=progress_bar,
    )
    _announce(reporter, config, backend, device, global_batch, total, progress, resumed, adapter, options)
    if val_loader is None:
        reporter.log("note: make_data_loaders() returned no validation loader: training without validation")
    if changed:
        reporter.log(changed)
    ckpt_ctx = CheckpointContext(
        output_dir, config, backend, model, optimizer, step, train_metrics, progress, best
    )
    ckpt_ctx.model_dir = model_def.directory  # in state.json: load_trial and export find the definition
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
            # A stop vote, settled after the step (it overlaps it); with aggregation at a window's end.
            vote = votes.start(progress.batches, stop.requested, step.ends_window())
            watch.beat()
            where = f"training batch {progress.batches + 1}"
            batch, records = adapter.prepare(batch, device, where, non_blocking)

            with step.forward():
                loss, metrics = adapter.train_step(
                    batch, model, progress.epoch_index, progress.batches, where
                )
            step.step(loss)  # backward; every aggregation_frequency batches the optimizer's step

            # Harness duties: metrics stay on the device until the next report.
            progress.loss_log.append(loss.detach().float())
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
            best_so_far = abandoned = stopped_early = False
            due = done or (validate_every and progress.batches % validate_every == 0)
            due = due or searcher.validation_due(progress.batches)
            if due and val_loader is not None:
                with step.forward():  # validation under the same autocast as training
                    result = adapter.evaluate(model, val_loader, device, backend, stop)
                abandoned = result is None  # a stop request meanwhile: checkpoint and stop now
                if not abandoned:
                    last_validation = result
                    _check_searcher_metric(config, last_validation)
                    best_so_far = best.checkpoint_after(last_validation)
                    reporter.report(
                        "validation", progress.batches, progress.epoch, progress.records, last_validation
                    )
                    stopped_early = searcher.should_stop(progress.batches, last_validation)
            stopping = votes.finish(vote, progress.batches) or abandoned or stopped_early
            periodic = checkpoint_every and progress.batches % checkpoint_every == 0
            if done or stopping or periodic or best_so_far:
                path = ckpt_ctx.save(last_validation)
                if stopped_early:
                    searcher.stopped(progress.batches)
                    reporter.log(f"stopped early by the searcher at batch {progress.batches}: {path}")
                    reporter.close()
                    return last_validation
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

    if step.skipped:
        reporter.log(f"fp16: the loss scaler skipped {step.skipped} optimizer step(s) (inf/NaN gradients)")
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
    options: optimizations.TrainingOptions,
) -> None:
    """The run's first console lines: what trains where, and anything the user should know."""
    extra = options.describe()
    if backend.size == 1 and backend.controller == "none":
        where = f"{device}, one process (no launcher)"
    else:
        where = f"{device} with {backend.size} rank{'s' if backend.size > 1 else ''} ({backend.controller})"
    reporter.log(
        f"training on {where}, global batch {global_batch}, {total} batches "
        f"({progress.batches_per_epoch} per epoch), trial API {adapter.api}" + (f"; {extra}" if extra else "")
    )
    k = options.aggregation_frequency
    if total % k:
        reporter.log(
            f"note: training ends {total % k} batch(es) into an aggregation window of {k}: those batches' "
            "gradients stay in the last checkpoint and are not applied (make the length a multiple of "
            f"{k} to apply them)"
        )
    slots = config.slots_per_trial
    if slots is not None and slots != backend.size:
        reporter.log(
            f"note: the config's resources.slots_per_trial is {slots}, but the launcher started "
            f"{backend.size}; training on {backend.size} (the launcher decides)"
        )
    if resumed:
        reporter.log(
            f"resuming from {resumed['path']} at batch {progress.batches} (epoch {progress.epoch:.2f})"
        )
    if progress.batches >= total:
        reporter.log(f"already trained {progress.batches} of {total} batches; nothing to do")


def _every(length: Any, progress: Progress, global_batch: int) -> Optional[int]:
    return length.to_batches(progress.batches_per_epoch, global_batch) if length else None


# ----------------------------------------------------------------------------------------------------------
# The duties, out of the way of the loop.


def _report_training(
    acc: MetricAccumulator, progress: Progress, reporter: Reporter, backend: Any, step: OptimizerStep
) -> None:
    sums, weights = training_totals(acc, progress, backend)
    metrics = means(sums, weights)
    metrics.update(step.report())  # lr, loss scale: the same on every rank, no reduction
    reporter.report("training", progress.batches, progress.epoch, progress.records, metrics)


def _check_searcher_metric(config: ExperimentConfig, metrics: Dict[str, Any]) -> None:
    name = config.searcher.metric
    if name is not None and name not in metrics:
        raise HarnessError(
            f"config key 'searcher.metric': '{name}' is not a validation metric "
            f"(have: {', '.join(sorted(metrics))})"
        )
