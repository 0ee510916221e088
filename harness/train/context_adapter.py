"""Determined's trial API as a `TrialAdapter`: a trial made with a context (harness/train/context.py).

``ContextAdapter``: the trial's ``train_batch(batch, epoch_idx, batch_idx)`` runs backward and the optimizer
step through the context; the loop's ``step.step`` is then `ContextStep`'s end of the batch. Validation is
``evaluate_batch`` in any of Determined's signatures, weighted by records (exact at any number of ranks),
plus the wrapped reducers; or ``evaluate_full_dataset(loader)`` on rank 0. Callbacks run at the points
Determined ran them, on every rank.

``ContextModelAdapter``: Determined 0.12's form (``build_model`` / ``optimizer``, ``train_batch(batch,
model, epoch_idx, batch_idx)`` returning the loss): the harness runs backward and the step, as for PEDL.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

import torch

from harness.api.context import ContextTrial, InvalidHP
from harness.api.trial import CONTEXT_API, CONTEXT_MODEL_API, defines
from harness.distributed.backend import Backend
from harness.errors import HarnessError
from harness.train.adapters import BatchAdapter, FullDatasetAdapter, loss_tensor
from harness.train.batches import to_device
from harness.train.context import Context
from harness.train.context_step import ContextStep


class InvalidHyperparameters(HarnessError):
    """The trial raised det.InvalidHP: it ends as invalid, with no restart (exit status 2)."""


def invalid(e: InvalidHP) -> InvalidHyperparameters:
    return InvalidHyperparameters(
        f"the trial raised InvalidHP: {e or 'no message'}; the trial ends as invalid"
    )


def _takes(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _evaluate_args(trial: Any) -> str:
    """Which of Determined's evaluate_batch signatures the trial uses: (batch), (batch, model),
    (batch, batch_idx)."""
    params = list(inspect.signature(trial.evaluate_batch).parameters)
    if len(params) >= 2 and params[1] == "batch_idx":
        return "batch_idx"
    return "model" if len(params) >= 2 else ""


class _Callbacks:
    """The trial's callbacks, called on every rank at Determined's points."""

    def __init__(self, callbacks: Dict[str, Any]):
        self.all = list(callbacks.values())
        self.started = False

    def call(self, name: str, *args: Any) -> None:
        for c in self.all:
            fn = getattr(c, name, None)
            if fn is None:
                continue
            if name == "on_training_epoch_start" and not inspect.signature(fn).parameters:
                fn()  # before Determined 0.17.8 it took no epoch
            else:
                fn(*args)


class ContextAdapter(FullDatasetAdapter):
    """Determined's ``PyTorchTrial(context)`` with ``wrap_model`` / ``wrap_optimizer``."""

    api = CONTEXT_API
    training_source = "train_batch()"

    def __init__(self, trial: Any, context: Context):
        super().__init__(trial)
        self.context = context
        self.full_dataset = defines(type(trial), "evaluate_full_dataset")
        self.validation_source = "evaluate_full_dataset()" if self.full_dataset else "evaluate_batch()"
        self.evaluate_args = "" if self.full_dataset else _evaluate_args(trial)
        self.batch_length = type(trial).get_batch_length is not ContextTrial.get_batch_length
        self.train_takes_model = _takes(trial.train_batch, "model")
        self.callbacks = _Callbacks({})
        self.batches_per_epoch = 1

    def start(self, batches_per_epoch: int) -> ContextStep:
        """After the loaders: callbacks are built, and the step object the loop calls is made."""
        callbacks = self.trial.build_callbacks() if defines(type(self.trial), "build_callbacks") else {}
        if not isinstance(callbacks, dict):
            raise HarnessError(
                f"build_callbacks() returned a {type(callbacks).__name__}; "
                "expected a dict of callbacks by name"
            )
        self.context.set_callbacks(callbacks)
        self.callbacks = _Callbacks(callbacks)
        self.batches_per_epoch = batches_per_epoch
        return ContextStep(self.context, batches_per_epoch)

    def prepare(self, batch: Any, device: torch.device, where: str, non_blocking: bool) -> Tuple[Any, int]:
        if not self.batch_length:
            return super().prepare(batch, device, where, non_blocking)
        batch = to_device(batch, device, where, non_blocking)
        return batch, int(self.trial.get_batch_length(batch))

    def train_step(  # type: ignore[override]  # BatchAdapter's always has a loss; this may have none
        self, batch: Any, model: torch.nn.Module, epoch_idx: int, batch_idx: int, where: str
    ) -> Tuple[Optional[torch.Tensor], Optional[Dict[str, Any]]]:
        callbacks = self.callbacks
        if callbacks.all:
            if not callbacks.started:
                callbacks.started = True
                callbacks.call("on_training_start")
            if batch_idx % self.batches_per_epoch == 0:
                callbacks.call("on_training_epoch_start", epoch_idx)
        try:
            if self.train_takes_model:  # 0.12's wrapped form: train_batch(batch, model, epoch_idx, batch_idx)
                out = self.trial.train_batch(batch, model, epoch_idx, batch_idx)
            else:
                out = self.trial.train_batch(batch, epoch_idx, batch_idx)
        except InvalidHP as e:
            raise invalid(e) from e
        if callbacks.all and (batch_idx + 1) % self.batches_per_epoch == 0:
            callbacks.call("on_training_epoch_end", epoch_idx)
        if isinstance(out, torch.Tensor):
            return loss_tensor(out, where, "train_batch()"), None
        if not isinstance(out, dict):
            raise HarnessError(
                f"train_batch() returned a {type(out).__name__} at {where}; expected a dict of metrics"
            )
        if "loss" not in out:  # e.g. a GAN's two losses: every entry is a training metric
            return None, out
        others = {k: v for k, v in out.items() if k != "loss"}
        return loss_tensor(out, where, "train_batch()"), others or None

    def validation_loader(self, loader: Any, rank: int, size: int) -> Any:
        if self.full_dataset:
            return super().validation_loader(loader, rank, size)
        return BatchAdapter.validation_loader(self, loader, rank, size)

    def evaluate(
        self, model: torch.nn.Module, loader: Any, device: torch.device, backend: Backend, stop: Any = None
    ) -> Optional[Dict]:
        self.callbacks.call("on_validation_start")
        self.context.reset_reducers(for_validation=True)
        if self.full_dataset:
            result = super().evaluate(model, loader, device, backend, stop)
        else:
            self._batch_idx = 0
            result = BatchAdapter.evaluate(self, model, loader, device, backend, stop)
        if result is None:
            return None
        result.update(self.context.reduce_metrics(for_validation=True))
        self.callbacks.call("on_validation_end", result)
        return result

    def batch_metrics(self, batch: Any, model: torch.nn.Module) -> Any:
        if self.evaluate_args == "model":
            out = self.trial.evaluate_batch(batch, model)
        elif self.evaluate_args == "batch_idx":
            out = self.trial.evaluate_batch(batch, self._batch_idx)
        else:
            out = self.trial.evaluate_batch(batch)
        self._batch_idx += 1
        return out

    def run_full_dataset(self, loader: Any, model: torch.nn.Module) -> Any:
        if _takes(self.trial.evaluate_full_dataset, "model"):
            return self.trial.evaluate_full_dataset(loader, model)
        return self.trial.evaluate_full_dataset(loader)

    def finish(self) -> None:
        self.callbacks.call("on_trial_shutdown")

    def checkpointed(self, path: str) -> None:
        self.callbacks.call("on_checkpoint_end", path)


class ContextModelAdapter(BatchAdapter):
    """Determined 0.12's form: ``build_model`` / ``optimizer`` with a context; the harness steps."""

    api = CONTEXT_MODEL_API

    def __init__(self, trial: Any, context: Context):
        super().__init__(trial)
        self.context = context
        self.evaluate_args = _evaluate_args(trial) if defines(type(trial), "evaluate_batch") else ""

    def batch_metrics(self, batch: Any, model: torch.nn.Module) -> Any:
        if self.evaluate_args == "model":
            return self.trial.evaluate_batch(batch, model)
        return self.trial.evaluate_batch(batch)


def build_loaders(trial: Any, call: Any) -> Tuple[Any, Any]:
    """The trial's own loaders (every rank builds them; the harness shards them)."""
    train = call(trial.build_training_data_loader, "build_training_data_loader()")
    val = call(trial.build_validation_data_loader, "build_validation_data_loader()")
    return train, val


__all__ = ["ContextAdapter", "ContextModelAdapter", "InvalidHyperparameters", "build_loaders"]
