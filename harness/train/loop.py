"""The training loop: the hand-written Horovod loop (bench/hvd_loop.py), plus the harness's duties.

Read `train` top to bottom: set-up and resume, then the epoch loop. Each line of the hand-written loop is
here (sampler.set_epoch, zero_grad/forward/backward/step, the loss now and then, validation); what the
harness adds is one call each: metrics kept on the device, a schedule saying what is due, the run state
saved and restored as one, stops agreed by every rank.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

from harness.config import ExperimentConfig, optimizations
from harness.config.yaml12 import dump_yaml
from harness.definition import ModelDefinition
from harness.distributed import under_launcher, watchdog
from harness.distributed.backend import Backend
from harness.distributed.preemption import StopSignals, StopVotes
from harness.errors import Interrupted, say
from harness.output import provenance
from harness.search import trial as search_trial
from harness.train import resume, setup
from harness.train.report import Reporter
from harness.train.schedule import Schedule
from harness.train.state import DataOrder, Progress, RunState, TrainingMetrics, Validations, find_start

SEARCHER, SIGNAL = "searcher", "signal"  # why a run stops before its end


def train(
    model_def: ModelDefinition,
    config: ExperimentConfig,
    output_dir: str,
    backend: Backend,
    fresh: bool = False,
    resume_from: Optional[str] = None,
    progress_bar: bool = False,
    search_trial_file: Optional[str] = None,
) -> Dict[str, Any]:
    """Train the trial as `config` says, resuming from a checkpoint in `output_dir` if there is one; returns
    the last validation's metrics."""
    watch = watchdog.current()
    watch.phase(watchdog.SETUP)  # setup_timeout until the first batch (start-up had its own limit)
    stop = StopSignals()
    if under_launcher():
        stop.watch_launchers()  # a rank whose launcher dies stops too, instead of training on as an orphan
    start = find_start(output_dir, fresh, resume_from, backend)  # rank 0 reads it; every rank learns it
    seed = setup.agree_on_seed(config.reproducibility.experiment_seed, backend, start.resumed)
    config.reproducibility.experiment_seed = seed
    resumed = start.resumed
    changed = resume.check_config(resumed["config"], config.as_dict(), resumed["path"]) if resumed else None

    run = setup.build_training(model_def, config, backend, seed, stop)
    model, step, adapter, device = run.model, run.step, run.parts.adapter, run.parts.device
    progress = Progress(batches_per_epoch=len(run.train_loader))
    metrics = TrainingMetrics(device, adapter.training_source)
    data = DataOrder(run.train_loader, run.sampler, run.per_rank_batch)
    validations = Validations(config)
    state = RunState(config, backend, model, run.optimizer, step, data, metrics, progress, validations)
    state.model_dir = model_def.directory  # in state.json: load_trial and export find the definition
    state.model_files = provenance.fingerprint(model_def.directory) if backend.rank == 0 else None
    state.restore(start)  # resume: every piece of run state, as one
    backend.broadcast_model(model)
    setup.seed_everything(seed + backend.rank)  # per-rank randomness (dropout, augmentation) from here on

    schedule = Schedule.of(config, progress.batches_per_epoch, run.global_batch)
    searcher = search_trial.connect(search_trial_file, backend, schedule.total)  # may stop the run early
    schedule = dataclasses.replace(schedule, rungs=frozenset(searcher.rungs))
    start.begin()  # set-up succeeded: an earlier run in OUTPUT is moved aside only now
    if backend.rank == 0:
        with open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            dump_yaml(config.as_dict(), f)
    votes, non_blocking = StopVotes(backend, progress.batches), device.type == "cuda"
    resume_at = progress.batches if resumed else None
    late: Optional[Callable[[], None]] = None  # a training report, reduced while the next batch trains
    due = schedule.next_due(progress.batches)  # the next batch with a duty (report, validation, ...)
    with Reporter(output_dir, backend.rank == 0, resume_at, progress_bar) as reporter:
        _announce(reporter, config, backend, run, schedule, progress, resumed, changed)
        if schedule.initial_validation_due(progress.batches) and run.val_loader is not None:
            _validate(run, state, None, reporter, stop)  # the untrained model's metrics, at batch 0
        watch.phase("training")
        reporter.start_training(schedule.total)
        model.train()
        while not schedule.done(progress.batches):
            reporter.start_period(schedule.until_report(progress.batches), run.global_batch)
            for batch in data.epoch(progress):  # sampler.set_epoch, mid-epoch resume
                # A stop vote, settled after the step (it overlaps it); with aggregation at a window's end.
                vote = votes.start(progress.batches, stop.requested, step.ends_window())
                watch.beat()
                where = f"training batch {progress.batches + 1}"
                batch, records = adapter.prepare(batch, device, where, non_blocking)
                with step.forward():
                    loss, batch_metrics = adapter.train_step(
                        batch, model, progress.epoch_index, progress.batches, where
                    )
                step.step(loss)  # backward; every aggregation_frequency batches the optimizer's step

                # The harness's duties: metrics stay on the device until a report; the schedule says when.
                metrics.add(loss, batch_metrics)
                progress.advance(records * backend.size)
                reporter.advance(records * backend.size)
                batches = progress.batches
                if batches < due and vote is None and late is None:
                    continue  # nothing is due after this batch: on to the next, as the hand-written loop
                late = _written(late)  # the last batch's report: its allreduce overlapped this batch
                due = schedule.next_due(batches)
                if schedule.report_due(batches):
                    late = _report_training(state, reporter)
                    reporter.start_period(schedule.until_report(batches), run.global_batch)
                save, why_stop = schedule.done(batches) or schedule.checkpoint_due(batches), None
                if schedule.validation_due(batches) and run.val_loader is not None:
                    late = _written(late)
                    with reporter.aside():
                        better, why_stop = _validate(run, state, searcher, reporter, stop)
                    save = save or better
                if votes.finish(vote, batches) and why_stop is None:  # every rank agreed on a stop
                    why_stop = SIGNAL
                if save or why_stop:
                    late = _written(late)  # before the checkpoint's own reduction and lines
                    with reporter.aside():
                        path = state.save(output_dir)
                    if why_stop:
                        return _stopped(why_stop, path, state, searcher, reporter, stop)
                if schedule.done(batches):
                    break
            else:
                progress.end_epoch()
                step.end_epoch()  # an epoch-wise LR scheduler
        if step.skipped:
            skipped = step.skipped
            reporter.log(f"fp16: the loss scaler skipped {skipped} optimizer step(s) (inf/NaN gradients)")
    if backend.rank == 0:
        say(f"results: {os.path.abspath(reporter.path)}")
    return state.validations.last


# ----------------------------------------------------------------------------------------------------------
# The duties, out of the way of the loop.


def _report_training(state: RunState, reporter: Reporter) -> Callable[[], None]:
    """The window's training metrics, averaged over its batches and the ranks: their allreduce starts
    now, and the report is written when the returned function is called (after the next batch's step, so
    that the allreduce's round trip overlaps it, as DDP's bucket allreduces overlap the backward pass)."""
    progress = state.progress
    batches, epoch, records = progress.batches, progress.epoch, progress.records
    # lr, loss scale (the same on every rank) and a context trial's reducers (a collective of their own,
    # finished before the metrics' allreduce starts: no collective of the main thread overlaps it).
    others = state.step.report()
    reduce = state.metrics.start_report(state.backend, batches)

    def write() -> None:
        reduced = reduce()
        reduced.update(others)
        reporter.report("training", batches, epoch, records, reduced)

    return write


def _written(late: Optional[Callable[[], None]]) -> Optional[Callable[[], None]]:
    """Write a training report whose allreduce is under way, if there is one; None: none is pending now."""
    if late is not None:
        late()
    return None


def _validate(
    run: setup.Training, state: RunState, searcher: Any, reporter: Reporter, stop: StopSignals
) -> Tuple[bool, Optional[str]]:
    """Validate: (whether to checkpoint after it, why to stop now: the searcher, a stop meanwhile, None)."""
    with run.step.forward():  # validation under the same autocast as training
        result = run.parts.adapter.evaluate(run.model, run.val_loader, run.parts.device, state.backend, stop)
    if result is None:  # a stop request meanwhile: checkpoint and stop now
        return False, SIGNAL
    better = state.validations.record(result)
    progress = state.progress
    reporter.report("validation", progress.batches, progress.epoch, progress.records, result)
    if searcher is None:  # the initial validation: nothing to tell the searcher
        return better, None
    return better, SEARCHER if searcher.should_stop(progress.batches, result) else None


def _stopped(
    why: str, path: str, state: RunState, searcher: Any, reporter: Reporter, stop: StopSignals
) -> Dict[str, Any]:
    """A run that stops before its end, after its checkpoint: by the searcher, or by a stop signal."""
    batches = state.progress.batches
    if why == SEARCHER:
        searcher.stopped(batches)
        reporter.log(f"stopped early by the searcher at batch {batches}: {path}")
        return state.validations.last
    reporter.log(
        f"stopped by {stop.signal_name or 'a stop request on another rank'} at batch {batches}; "
        f"checkpoint: {path}"
    )
    if stop.exit_code:
        raise Interrupted(f"stopped by {stop.signal_name} at batch {batches}")
    return state.validations.last


def _announce(
    reporter: Reporter,
    config: ExperimentConfig,
    backend: Backend,
    run: setup.Training,
    schedule: Schedule,
    progress: Progress,
    resumed: Optional[Dict[str, Any]],
    changed: Optional[str],
) -> None:
    """The run's first console lines: what trains where, and anything the user should know."""
    options: optimizations.TrainingOptions = run.parts.options
    extra = options.describe()
    total = schedule.total
    device, ranks = run.parts.device, backend.size
    if ranks == 1 and backend.controller == "none":  # torchrun's one rank needs no process group either
        where = f"{device}, one process " + ("(torchrun, 1 rank)" if under_launcher() else "(no launcher)")
    else:
        where = f"{device} with {ranks} rank{'s' if ranks > 1 else ''} ({backend.controller})"
        where += " under torch.distributed" if backend.name == "torch" else ""
    reporter.log(
        f"training on {where}, global batch {run.global_batch}, {total} batches "
        f"({progress.batches_per_epoch} per epoch), trial API {run.parts.adapter.api}"
        + (f"; {extra}" if extra else "")
    )
    k = options.aggregation_frequency
    if total % k:
        reporter.log(
            f"note: training ends {total % k} batch(es) into an aggregation window of {k}: those batches' "
            "gradients stay in the last checkpoint and are not applied (make the length a multiple of "
            f"{k} to apply them)"
        )
    slots = config.slots_per_trial
    if slots is not None and slots != ranks:
        reporter.log(
            f"note: the config's resources.slots_per_trial is {slots}, but the launcher started "
            f"{ranks}; training on {ranks} (the launcher decides)"
        )
    if resumed:
        reporter.log(
            f"resuming from {resumed['path']} at batch {progress.batches} (epoch {progress.epoch:.2f})"
        )
    if progress.batches >= total:
        reporter.log(f"already trained {progress.batches} of {total} batches; nothing to do")
    if run.val_loader is None:
        reporter.log("note: make_data_loaders() returned no validation loader: training without validation")
    if changed:
        reporter.log(changed)
