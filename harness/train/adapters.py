"""Each trial API translated into the one interface the loop calls, `TrialAdapter`.

The loop only calls ``adapter.prepare`` (a batch to the device, its records), ``adapter.train_step`` (the
loss and other training metrics) and ``adapter.evaluate`` (validation metrics). Which API a class uses
follows from the methods it defines (`api_of`); a third API (e.g. Determined's ``PyTorchTrial(context)``)
is a third subclass here, not a change to the loop.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Dict, Optional, Tuple

import torch

from harness import distributed
from harness.api.trial import (
    BATCH_API,
    CONTEXT_API,
    CONTEXT_MODEL_API,
    LOSSES_API,
    PyTorchTrial,
    api_of,
    defines,
)
from harness.distributed import watchdog
from harness.distributed.backend import Backend
from harness.distributed.preemption import StopRequested
from harness.errors import HarnessError
from harness.train.batches import batch_records, batch_to_device, count_records, to_device
from harness.train.metrics import MetricAccumulator
from harness.train.sharding import shard_validation_loader


def make_adapter(trial: Any, context: Any = None) -> TrialAdapter:
    """The adapter of the trial's API (`context`: the context a Determined-style trial was made with)."""
    api = api_of(type(trial))
    if api == CONTEXT_API:
        from harness.train.context_adapter import ContextAdapter

        return ContextAdapter(trial, context)
    if api == CONTEXT_MODEL_API and not defines(type(trial), "evaluate_full_dataset"):
        from harness.train.context_adapter import ContextModelAdapter

        return ContextModelAdapter(trial, context)
    if api == LOSSES_API:
        return LossesAdapter(trial)
    if defines(type(trial), "evaluate_full_dataset"):
        return FullDatasetAdapter(trial)
    return BatchAdapter(trial)


def loss_tensor(losses: Any, where: str, what: str) -> torch.Tensor:
    """The tensor to minimise: `losses` itself or its "loss" entry; it must be a scalar."""
    if type(losses) is torch.Tensor and losses.dim() == 0:
        return losses  # the common case, checked first
    loss = losses
    if isinstance(losses, dict):
        if "loss" not in losses:
            raise HarnessError(
                f"{what} returned a dict without the key 'loss' (keys: {', '.join(map(str, losses))})"
            )
        loss = losses["loss"]
    if not isinstance(loss, torch.Tensor):
        raise HarnessError(f"{what} returned a {type(loss).__name__} at {where}; expected a scalar tensor")
    if loss.numel() != 1:
        raise HarnessError(
            f"{what} returned a loss of shape {tuple(loss.shape)} at {where}; "
            "expected a scalar (reduce it, e.g. with .mean())"
        )
    return loss if loss.dim() == 0 else loss.reshape(())


def _other_entries(losses: Any) -> Optional[Dict[str, Any]]:
    """The entries of a dict besides "loss" (counted from the loop's loss log): training metrics."""
    if isinstance(losses, dict) and len(losses) > 1:
        return {k: v for k, v in losses.items() if k != "loss"}
    return None


class TrialAdapter(abc.ABC):
    """What the loop needs from a trial, whatever its API."""

    api: str
    training_source: str  # names the user's methods in training-metric errors
    validation_source: str

    def __init__(self, trial: Any):
        self.trial = trial

    @abc.abstractmethod
    def prepare(self, batch: Any, device: torch.device, where: str, non_blocking: bool) -> Tuple[Any, int]:
        """The batch on `device`, and its number of records on this rank."""

    @abc.abstractmethod
    def train_step(
        self, batch: Any, model: torch.nn.Module, epoch_idx: int, batch_idx: int, where: str
    ) -> Tuple[Optional[torch.Tensor], Optional[Dict[str, Any]]]:
        """The loss to minimise and, if any, other training metrics of this batch (no loss: a trial that
        stepped its optimizers itself and returned no "loss" entry)."""

    def validation_loader(self, loader: Any, rank: int, size: int) -> Any:
        """The validation loader this rank iterates (by default its unpadded shard)."""
        return shard_validation_loader(loader, rank, size)

    def evaluate(
        self, model: torch.nn.Module, loader: Any, device: torch.device, backend: Backend, stop: Any = None
    ) -> Optional[Dict]:
        """Exact validation: each batch weighted by its records, summed over all ranks, divided by the total
        number of records. None if a stop was requested (`stop.requested`) on any rank meanwhile: every
        rank then abandons it (they agree in one small allreduce)."""
        metrics = MetricAccumulator(device, self.validation_source)
        model.eval()
        watch = watchdog.current()
        abandoned = False
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if stop is not None and stop.requested:
                    abandoned = True
                    break
                watch.beat()
                where = f"validation batch {i + 1} of rank {backend.rank}"
                batch, records = self.prepare(batch, device, where, False)
                metrics.add(self.batch_metrics(batch, model), weight=records)
        model.train()
        if stop is not None and backend.allreduce_sum(torch.tensor([int(abandoned)])).item() > 0:
            return None
        return metrics.reduce(backend)

    def batch_metrics(self, batch: Any, model: torch.nn.Module) -> Any:
        raise NotImplementedError


class LossesAdapter(TrialAdapter):
    """PEDL's first API: the harness runs ``model(input)``, the trial's ``losses`` and metrics."""

    api = LOSSES_API
    training_source = "losses()/training_metrics()"
    validation_source = "validation_metrics()"

    def __init__(self, trial: Any):
        super().__init__(trial)
        # Other training metrics than the loss cost an accumulation per batch: only when there are any.
        self.extra_metrics = type(trial).training_metrics is not PyTorchTrial.training_metrics

    def prepare(self, batch: Any, device: torch.device, where: str, non_blocking: bool) -> Tuple[Any, int]:
        inputs, labels = batch_to_device(batch, device, where, non_blocking)
        return (inputs, labels), batch_records(inputs, labels, where)

    def train_step(
        self, batch: Any, model: torch.nn.Module, epoch_idx: int, batch_idx: int, where: str
    ) -> Tuple[torch.Tensor, Optional[Dict[str, Any]]]:
        inputs, labels = batch
        predictions = model(inputs)
        losses = self.trial.losses(predictions, labels)
        loss = loss_tensor(losses, where, "losses()")
        others = _other_entries(losses)
        if not self.extra_metrics:
            return loss, others
        with torch.no_grad():
            extra = self.trial.training_metrics(predictions, labels, losses) or {}
        return loss, {**extra, **(others or {})}

    def batch_metrics(self, batch: Any, model: torch.nn.Module) -> Any:
        inputs, labels = batch
        predictions = model(inputs)
        return self.trial.validation_metrics(predictions, labels, self.trial.losses(predictions, labels))


class BatchAdapter(TrialAdapter):
    """PEDL's later API: ``train_batch`` and ``evaluate_batch`` run the forward pass themselves."""

    api = BATCH_API
    training_source = "train_batch()"
    validation_source = "evaluate_batch()"

    def prepare(self, batch: Any, device: torch.device, where: str, non_blocking: bool) -> Tuple[Any, int]:
        if type(batch) in (tuple, list) and len(batch) == 2:  # the common case: nothing to convert
            a, b = batch
            if type(a) is torch.Tensor and type(b) is torch.Tensor and a.dim() > 0:
                if a.device == device and b.device == device:
                    return batch, a.shape[0]
        batch = to_device(batch, device, where, non_blocking)
        records = count_records(batch, where)  # the first tensor's first dimension (disagreements said)
        if records is None:
            raise HarnessError(f"{where} holds no tensor with a batch dimension")
        return batch, records

    def train_step(
        self, batch: Any, model: torch.nn.Module, epoch_idx: int, batch_idx: int, where: str
    ) -> Tuple[torch.Tensor, Optional[Dict[str, Any]]]:
        out = self.trial.train_batch(batch, model, epoch_idx, batch_idx)
        if not isinstance(out, (torch.Tensor, dict)):
            raise HarnessError(
                f"train_batch() returned a {type(out).__name__} at {where}; "
                "expected a scalar tensor or a dict with the key 'loss'"
            )
        return loss_tensor(out, where, "train_batch()"), _other_entries(out)

    def batch_metrics(self, batch: Any, model: torch.nn.Module) -> Any:
        return self.trial.evaluate_batch(batch, model)


class FullDatasetAdapter(BatchAdapter):
    """``evaluate_full_dataset``: rank 0 runs it on the complete validation loader; the others wait."""

    api = "train_batch/evaluate_full_dataset"
    validation_source = "evaluate_full_dataset()"

    def validation_loader(self, loader: Any, rank: int, size: int) -> Any:
        if not hasattr(loader, "__iter__"):
            raise HarnessError(
                f"make_data_loaders() returned a {type(loader).__name__} as the validation loader; "
                "expected a DataLoader"
            )
        return loader  # unsharded: the trial's code must see every record, once

    def run_full_dataset(self, loader: Any, model: torch.nn.Module) -> Any:
        return self.trial.evaluate_full_dataset(loader, model)

    def evaluate(
        self, model: torch.nn.Module, loader: Any, device: torch.device, backend: Backend, stop: Any = None
    ) -> Optional[Dict]:
        def run() -> Dict:
            model.eval()
            interruptible = stop.interruptible() if stop is not None else contextlib.nullcontext()
            with torch.no_grad(), interruptible:
                result = self.run_full_dataset(loader, model)
            model.train()
            metrics = MetricAccumulator(device, self.validation_source)
            metrics.add(result)  # checks the values; plain numbers for every rank
            return metrics.reduce(distributed.Local())

        try:
            return distributed.run_on_chief(backend, run)
        except StopRequested:  # a stop during it (on rank 0): abandoned on every rank
            model.train()
            return None
