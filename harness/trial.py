"""The user-facing API: `PyTorchTrial`, `get_hyperparameter`, `get_download_data_dir`."""

from __future__ import annotations

import abc
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from harness.errors import HarnessError

# The running trial's hyperparameters and download directory, set by the harness before user code runs.
_hparams: Dict[str, Any] = {}
_download_data_dir: Optional[str] = None

Metrics = Dict[str, Any]  # name -> Tensor, ndarray or Python number (scalars or arrays)


class PyTorchTrial(abc.ABC):
    """Subclass this in ``model_def.py`` to define what to train.

    The harness calls, on every rank: ``build_model``, ``optimizer``, then for every batch ``losses`` and
    (optionally) ``training_metrics``; during validation ``losses`` and ``validation_metrics``.
    PEDL's older signatures ``build_model(self)`` and ``optimizer(self, model, hparams)`` are accepted too.
    """

    @abc.abstractmethod
    def build_model(self, hparams: Dict[str, Any]) -> nn.Module:
        """Return the model. Its ``forward`` gets a batch's input as one argument, whatever its structure."""

    @abc.abstractmethod
    def losses(self, predictions: Any, labels: Any) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return a scalar loss tensor, or a dict of losses whose key ``"loss"`` is the one to minimise."""

    @abc.abstractmethod
    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Return the optimizer; the harness wraps it in ``hvd.DistributedOptimizer``."""

    @abc.abstractmethod
    def batch_size(self) -> int:
        """The *global* training batch size; each of N ranks takes ``batch_size() / N`` records."""

    @abc.abstractmethod
    def validation_metrics(self, predictions: Any, labels: Any, losses: Any) -> Metrics:
        """Metrics of one validation batch; the harness averages them over the whole validation set."""

    def training_metrics(self, predictions: Any, labels: Any, losses: Any) -> Metrics:
        """Optional metrics of one training batch, reported beside the losses."""
        return {}


REQUIRED_METHODS = tuple(sorted(PyTorchTrial.__abstractmethods__))


def get_hyperparameter(name: str) -> Any:
    """The value of hyperparameter `name` from the experiment config."""
    try:
        return _hparams[name]
    except KeyError:
        have = ", ".join(sorted(_hparams)) or "none"
        raise HarnessError(
            f"hyperparameter '{name}' is not in the config's hyperparameters (have: {have})"
        ) from None


def get_download_data_dir() -> str:
    """The directory that ``download_data`` returned on this machine."""
    if _download_data_dir is None:
        raise HarnessError("get_download_data_dir() called, but the model definition has no download_data()")
    return _download_data_dir


def _set_context(hparams: Dict[str, Any], download_data_dir: Optional[str]) -> None:
    global _hparams, _download_data_dir
    _hparams = dict(hparams)
    _download_data_dir = download_data_dir
