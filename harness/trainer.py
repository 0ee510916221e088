"""Determined's Trainer scripts (0.21+), run by ``python train.py`` alone or under horovodrun / mpirun:

    with det.pytorch.init() as context:
        trial = MyTrial(context, hparams=...)
        det.pytorch.Trainer(trial, context).fit(max_length=det.pytorch.Batch(1000))

`init` starts this rank as the harness would (Horovod under a launcher, else one process), seeds it and gives
the trial its context; `Trainer.fit` runs the harness's loop on that trial with the periods it is given. The
output goes to ``$HARNESS_OUTPUT_DIR`` (default ``./output``), and a run resumes from the newest checkpoint
there, as ``harness`` does. Any error ends the rank with the harness's one line (``HARNESS_TRACEBACK=1``
shows the traceback).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Dict, Iterator, Optional

from harness.errors import HarnessError, say

OUTPUT_ENV = "HARNESS_OUTPUT_DIR"


def output_dir() -> str:
    return os.path.abspath(os.environ.get(OUTPUT_ENV) or "output")


def _script_dir() -> str:
    main = getattr(sys.modules.get("__main__"), "__file__", None) or sys.argv[0] or "."
    return os.path.dirname(os.path.abspath(main))


@contextlib.contextmanager
def init(
    *,
    hparams: Optional[Dict[str, Any]] = None,
    exp_conf: Optional[Dict[str, Any]] = None,
    distributed: Any = None,
    aggregation_frequency: int = 1,
    enable_tensorboard_logging: bool = True,
) -> Iterator[Any]:
    """``det.pytorch.init()``: this rank's PyTorchTrialContext (a context manager); Horovod ends with it."""
    with _one_line_errors():
        context = _start(hparams, exp_conf, distributed, aggregation_frequency)
    try:
        with _one_line_errors():
            yield context
    finally:
        context.backend.shutdown()


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """An error ends this rank as the harness's own do: one line, its exit status, the other ranks stopped
    by the launcher (`cli._guarded`); a Ctrl-C after the agreed checkpoint exits 130."""
    from harness import cli
    from harness.errors import Interrupted

    try:
        yield
    except Interrupted as e:
        raise SystemExit(e.exit_code) from None
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything; reported in one line
        error = e

        def reraise() -> int:
            raise error

        cli._guarded(reraise, _script_dir(), output_dir() if os.environ.get(OUTPUT_ENV) else None)


def _start(hparams: Any, exp_conf: Any, distributed_context: Any, aggregation_frequency: int) -> Any:
    from harness import config as config_mod
    from harness import distributed
    from harness.api import trial as trial_api
    from harness.train import setup
    from harness.train.context import Context

    if distributed_context is not None:
        raise HarnessError(
            "pytorch.init(distributed=...) is not supported: the harness makes the ranks from the launcher "
            "(run the script under horovodrun or mpirun)"
        )
    if exp_conf is not None and not isinstance(exp_conf, dict):
        raise HarnessError(f"pytorch.init(exp_conf=...) got a {type(exp_conf).__name__}; expected a dict")
    cfg = config_mod.parse_config(dict(exp_conf or {}), "pytorch.init(exp_conf=...)")
    if hparams is not None:
        if not isinstance(hparams, dict):
            raise HarnessError(f"pytorch.init(hparams=...) got a {type(hparams).__name__}; expected a dict")
        cfg.hyperparameters = dict(hparams)
    if aggregation_frequency != 1:
        cfg.optimizations.aggregation_frequency = aggregation_frequency
    for line in cfg.warnings if distributed.env_rank() == 0 else []:
        say(f"harness: warning: {line}", sys.stderr)
    threads = distributed.torch_threads()
    backend = distributed.init()
    distributed.set_threads(backend, threads)
    device = setup.pick_device(backend)
    seed = setup.agree_on_seed(cfg.reproducibility.experiment_seed, backend, None)
    trial_api._set_context(cfg.hyperparameters, None, cfg.as_dict(), seed)
    setup.seed_everything(seed)  # every rank builds the same initial models
    return Context(cfg, backend, device, cfg.training_options, seed)


def _length(value: Any, what: str) -> Any:
    from harness.config import Length

    unit = getattr(value, "unit", None)
    number = getattr(value, "value", None)
    if (
        unit not in ("batches", "epochs", "records")
        or isinstance(number, bool)
        or not isinstance(number, int)
    ):
        raise HarnessError(
            f"Trainer.fit({what}=...) got {value!r}; expected pytorch.Batch(n), pytorch.Epoch(n) or "
            "pytorch.Record(n)"
        )
    if number <= 0:
        raise HarnessError(f"Trainer.fit({what}=...): the length must be positive, got {number}")
    return Length(unit, number)


class Trainer:
    """``det.pytorch.Trainer(trial, context)``: `fit` trains the trial with the harness's loop."""

    def __init__(self, trial: Any, context: Any) -> None:
        from harness.train.context import Context

        if not isinstance(context, Context):
            raise HarnessError(
                f"pytorch.Trainer(trial, context) got a {type(context).__name__} as the context; pass the "
                "one that `with pytorch.init() as context:` gives"
            )
        self.trial, self.context = trial, context

    def fit(
        self,
        checkpoint_period: Any = None,
        validation_period: Any = None,
        max_length: Any = None,
        reporting_period: Any = None,
        checkpoint_policy: str = "best",
        latest_checkpoint: Optional[str] = None,
        step_zero_validation: bool = False,
        test_mode: bool = False,
        profiling_enabled: bool = False,
    ) -> None:
        """Train until `max_length`, validating every `validation_period` and checkpointing every
        `checkpoint_period` (pytorch.Batch/Epoch/Record); `latest_checkpoint`: a checkpoint folder to resume
        from (else the newest in the output folder, if any)."""
        with _one_line_errors():
            self._fit(
                checkpoint_period,
                validation_period,
                max_length,
                reporting_period,
                checkpoint_policy,
                latest_checkpoint,
                step_zero_validation,
                test_mode,
                profiling_enabled,
            )

    def _fit(
        self,
        checkpoint_period: Any,
        validation_period: Any,
        max_length: Any,
        reporting_period: Any,
        checkpoint_policy: str,
        latest_checkpoint: Optional[str],
        step_zero_validation: bool,
        test_mode: bool,
        profiling_enabled: bool,
    ) -> None:
        from harness.config import CHECKPOINT_POLICIES
        from harness.definition import ModelDefinition
        from harness.distributed import watchdog
        from harness.output import jobstate
        from harness.output.lock import OutputLock
        from harness.train import loop

        for name, on in (("test_mode", test_mode), ("profiling_enabled", profiling_enabled)):
            if on:
                raise HarnessError(f"Trainer.fit({name}=True) is not supported by the harness")
        if max_length is None:
            raise HarnessError(
                "Trainer.fit() needs max_length here (no cluster searcher gives it): e.g. "
                "max_length=pytorch.Batch(1000) or pytorch.Epoch(2)"
            )
        cfg = self.context.config
        cfg.searcher.max_length = _length(max_length, "max_length")
        if validation_period is not None:
            cfg.min_validation_period = _length(validation_period, "validation_period")
        if checkpoint_period is not None:
            cfg.min_checkpoint_period = _length(checkpoint_period, "checkpoint_period")
        if reporting_period is not None:
            period = _length(reporting_period, "reporting_period")
            if period.unit != "batches":
                raise HarnessError("Trainer.fit(reporting_period=...): only pytorch.Batch(n) is supported")
            cfg.scheduling_unit = period.value
        if checkpoint_policy not in CHECKPOINT_POLICIES:
            raise HarnessError(
                f"Trainer.fit(checkpoint_policy={checkpoint_policy!r}): expected one of "
                + ", ".join(CHECKPOINT_POLICIES)
            )
        cfg.checkpoint_policy = checkpoint_policy
        cfg.perform_initial_validation = cfg.perform_initial_validation or bool(step_zero_validation)
        directory = _script_dir()
        module = os.path.splitext(os.path.basename(sys.argv[0] or "train.py"))[0]
        cfg.entrypoint = f"{module}:{type(self.trial).__name__}"
        model_def = ModelDefinition(
            directory=directory,
            trial_class=type(self.trial),
            make_data_loaders=None,
            download_data=None,
            prebuilt=(self.trial, self.context),
        )
        output = output_dir()
        os.environ[OUTPUT_ENV] = output
        backend = self.context.backend
        lock = OutputLock(output)
        if backend.rank == 0:
            lock.acquire()
        from harness import cli

        watchdog.start(
            backend.rank,
            cfg.stall_timeout,
            directory,
            lambda m, c: cli._fail(m, 1, c, output=output),
            cfg.setup_timeout,
        )
        jobstate.register_rank(output, backend.rank)
        try:
            loop.train(model_def, cfg, output, backend, resume_from=latest_checkpoint)
        finally:
            watchdog.current().disarm()
            lock.release()
