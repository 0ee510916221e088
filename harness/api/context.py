"""Determined's trial API: a trial made with a context (``__init__(self, context)``), the context's interface,
callbacks, metric reducers and ``InvalidHP``. The `determined` package re-exports these names.

The trial wraps its models, optimizers and LR schedulers with the context in ``__init__``, builds its data
loaders in ``build_training_data_loader`` / ``build_validation_data_loader``, and in ``train_batch`` runs the
forward pass and calls ``context.backward(loss)`` and ``context.step_optimizer(opt)`` itself. The harness's
implementation of the context lives in harness/train/context.py; this module holds what user code names.

Determined's 0.12 form (``build_model`` / ``optimizer`` with a context ``__init__``, the harness running
backward and the step) is the same class with those methods defined.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from harness.api.lr_scheduler import LRScheduler, StepMode
from harness.errors import HarnessError


class InvalidHP(Exception):
    """Raised by a trial whose hyperparameters cannot work: the trial ends as invalid (one line, no restart;
    in a search it is recorded as such and the search goes on)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)


class PyTorchCallback:
    """Hooks into training; return instances from the trial's ``build_callbacks()`` (a dict by name).

    Every rank calls them, at the same points; ``state_dict`` / ``load_state_dict`` go into checkpoints.
    """

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: Optional[str]) -> None:
        """Before training, after a resume (0.17+)."""

    def on_training_start(self) -> None:
        """Before the first training batch of this run."""

    def on_training_epoch_start(self, epoch_idx: int) -> None:
        """Before the first batch of each epoch (older callbacks take no argument)."""

    def on_training_epoch_end(self, epoch_idx: int) -> None:
        """After the last batch of each epoch."""

    def on_before_optimizer_step(self, parameters: Iterator[Any]) -> None:
        """After the gradients are synchronized and unscaled, before the optimizer steps."""

    def on_validation_start(self) -> None:
        """Before each validation."""

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        """After each validation, with its metrics (the same on every rank)."""

    def on_checkpoint_save_start(self, checkpoint: Dict[str, Any]) -> None:
        """Before a checkpoint is written; `checkpoint` holds what will be saved."""

    def on_checkpoint_load_start(self, checkpoint: Dict[str, Any]) -> None:
        """Before a checkpoint's state is loaded, on resume."""

    def on_checkpoint_end(self, checkpoint_dir: str) -> None:
        """After a checkpoint is complete, with its folder."""

    def on_trial_shutdown(self) -> None:
        """After training ends (also after a stop)."""

    def state_dict(self) -> Dict[str, Any]:
        """This callback's state, saved in every checkpoint."""
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class ClipGradsL2Norm(PyTorchCallback):
    """Clip the gradients' total L2 norm to `clip_value` before each optimizer step."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value = clip_value

    def on_before_optimizer_step(self, parameters: Iterator[Any]) -> None:
        torch.nn.utils.clip_grad_norm_(list(parameters), self.clip_value)


class ClipGradsL2Value(PyTorchCallback):
    """Clip each gradient element to [-clip_value, clip_value] before each optimizer step."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value = clip_value

    def on_before_optimizer_step(self, parameters: Iterator[Any]) -> None:
        torch.nn.utils.clip_grad_value_(list(parameters), self.clip_value)


class MetricReducer(abc.ABC):
    """A custom reduction of a validation (or training) metric across batches and ranks.

    ``update`` is the trial's own method, called with its batches; ``per_slot_reduce`` gives this rank's
    result; ``cross_slot_reduce`` gets every rank's results (in rank order) and returns the metric (a
    number, or a dict of them). Register with ``context.wrap_reducer(reducer, name=...)``.
    """

    @abc.abstractmethod
    def reset(self) -> None:
        """Before each validation (or training report window)."""

    @abc.abstractmethod
    def per_slot_reduce(self) -> Any:
        """This rank's reduced state; it is sent to every rank (keep it small, picklable)."""

    @abc.abstractmethod
    def cross_slot_reduce(self, per_slot_metrics: List[Any]) -> Any:
        """The metric from every rank's `per_slot_reduce` result."""


class PyTorchTrialContext:
    """What a Determined-style trial asks of the harness. The harness passes the running implementation
    (harness/train/context.py) to the trial's ``__init__``; this class documents the interface and is what
    model definitions import for type hints."""

    distributed: Any  # get_rank(), get_size(), get_local_rank(), get_local_size(), get_cross_rank()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The model on the training device; rank 0's weights are broadcast before training."""
        raise NotImplementedError

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, backward_passes_per_step: int = 1) -> Any:
        """The optimizer whose gradients are averaged over the ranks (Horovod's DistributedOptimizer)."""
        raise NotImplementedError

    def wrap_lr_scheduler(self, lr_scheduler: Any, step_mode: StepMode, frequency: int = 1) -> Any:
        """The scheduler, stepped by the harness as `step_mode` says and saved in checkpoints."""
        raise NotImplementedError

    def wrap_reducer(
        self, reducer: Any, name: Optional[str] = None, for_training: bool = True, for_validation: bool = True
    ) -> Any:
        """A `MetricReducer` (or a function of a list of per-batch values) that makes the metric `name`."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, gradient: Any = None, retain_graph: bool = False,
                 create_graph: bool = False) -> None:  # fmt: skip
        """``loss.backward()``, scaled under fp16."""
        raise NotImplementedError

    def step_optimizer(
        self,
        optimizer: Any,
        clip_grads: Optional[Callable[[Iterator[Any]], None]] = None,
        auto_zero_grads: bool = True,
        scaler: Any = None,
    ) -> None:
        """At the end of each aggregation window: synchronize, unscale, clip, step, zero the gradients."""
        raise NotImplementedError

    def to_device(self, data: Any) -> Any:
        """`data` (tensors in any nesting) on the training device."""
        raise NotImplementedError

    def get_hparam(self, name: str) -> Any:
        raise NotImplementedError

    def get_hparams(self) -> Dict[str, Any]:
        raise NotImplementedError

    def get_per_slot_batch_size(self) -> int:
        raise NotImplementedError

    def get_global_batch_size(self) -> int:
        raise NotImplementedError

    def get_data_config(self) -> Dict[str, Any]:
        raise NotImplementedError

    def get_experiment_config(self) -> Dict[str, Any]:
        raise NotImplementedError

    def get_trial_seed(self) -> int:
        raise NotImplementedError


TrialContext = PyTorchTrialContext  # det.TrialContext, for type hints


class ContextTrial(abc.ABC):
    """Determined's ``PyTorchTrial``: made with a context, it builds its own data loaders and, in
    ``train_batch(batch, epoch_idx, batch_idx)``, runs backward and the optimizer step through the context.
    Validation is ``evaluate_batch(batch)`` (or ``evaluate_batch(batch, batch_idx)``) or
    ``evaluate_full_dataset(data_loader)``."""

    trial_context_class = PyTorchTrialContext

    def __init__(self, context: PyTorchTrialContext) -> None:  # noqa: B027  # Determined's trials call super()
        pass

    @abc.abstractmethod
    def build_training_data_loader(self) -> Any:
        """The training loader (its batch size: ``context.get_per_slot_batch_size()``)."""

    @abc.abstractmethod
    def build_validation_data_loader(self) -> Any:
        """The validation loader."""

    def build_callbacks(self) -> Dict[str, PyTorchCallback]:
        """Callbacks by name (their state is checkpointed under that name)."""
        return {}

    def get_batch_length(self, batch: Any) -> int:
        """The number of records in `batch` (by default the first tensor's first dimension)."""
        raise NotImplementedError


def check_step_mode(step_mode: Any) -> StepMode:
    if not isinstance(step_mode, StepMode):
        raise HarnessError(
            f"wrap_lr_scheduler(): step_mode {step_mode!r} is not one of LRScheduler.StepMode's "
            + ", ".join(m.name for m in StepMode)
        )
    return step_mode


__all__ = [
    "ClipGradsL2Norm",
    "ClipGradsL2Value",
    "ContextTrial",
    "InvalidHP",
    "LRScheduler",
    "MetricReducer",
    "PyTorchCallback",
    "PyTorchTrialContext",
    "TrialContext",
]
