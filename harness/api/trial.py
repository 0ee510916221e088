"""The user-facing API: `PyTorchTrial` (both PEDL trial APIs), `get_hyperparameter` and its neighbours.

A trial class uses one of two APIs, told apart by the methods it defines:

- PEDL's first API: ``losses(predictions, labels)`` and ``validation_metrics(predictions, labels, losses)``
  (optionally ``training_metrics``); the harness runs the forward pass, ``model(input)``.
- PEDL's later API: ``train_batch(batch, model, epoch_idx, batch_idx)`` and ``evaluate_batch(batch, model)``
  or ``evaluate_full_dataset(data_loader, model)``; the trial runs the forward pass itself.

Both need ``build_model`` and ``optimizer``; ``batch_size()`` and ``create_lr_scheduler(optimizer)`` are
optional. `harness.adapters` turns either API into the one interface the training loop calls.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from harness.api.context import ContextTrial
from harness.errors import HarnessError

Metrics = Dict[str, Any]  # name -> Tensor, ndarray or Python number (scalars or arrays)


def _optional(fn: Any) -> Any:
    """Mark a PyTorchTrial method as a placeholder: a subclass 'defines' it only by overriding it."""
    fn.__harness_placeholder__ = True
    return fn


def defines(cls: type, name: str) -> bool:
    """Whether trial class `cls` (or a base of its own) implements method `name`."""
    method = getattr(cls, name, None)
    return (
        method is not None
        and not getattr(method, "__harness_placeholder__", False)
        and not getattr(method, "__isabstractmethod__", False)
    )


class PyTorchTrial(abc.ABC):
    """Subclass this in ``model_def.py`` to define what to train (module docstring: the two APIs).

    PEDL's older signatures ``build_model(self)`` and ``optimizer(self, model, hparams)`` are accepted too.
    """

    @abc.abstractmethod
    def build_model(self, hparams: Dict[str, Any]) -> nn.Module:
        """Return the model. (First API: its ``forward`` gets a batch's input as one argument.)"""

    @abc.abstractmethod
    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Return the optimizer; the harness wraps it in ``hvd.DistributedOptimizer``."""

    @_optional
    def batch_size(self) -> int:
        """The *global* training batch; without it: hyperparameter global_batch_size or batch_size."""
        raise NotImplementedError

    @_optional
    def create_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """Optional: ``LRScheduler(torch_scheduler, step_mode=...)``; the harness steps and saves it."""
        raise NotImplementedError

    # PEDL's first API ----------------------------------------------------------------------------------

    @_optional
    def losses(self, predictions: Any, labels: Any) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return a scalar loss tensor, or a dict of losses whose key ``"loss"`` is the one to minimise."""
        raise NotImplementedError

    @_optional
    def validation_metrics(self, predictions: Any, labels: Any, losses: Any) -> Metrics:
        """Metrics of one validation batch; the harness averages them over the whole validation set."""
        raise NotImplementedError

    def training_metrics(self, predictions: Any, labels: Any, losses: Any) -> Metrics:
        """Optional metrics of one training batch, reported beside the losses."""
        return {}

    # PEDL's later API ----------------------------------------------------------------------------------

    @_optional
    def train_batch(
        self, batch: Any, model: nn.Module, epoch_idx: int, batch_idx: int
    ) -> Union[torch.Tensor, Dict[str, Any]]:
        """Compute the loss of one batch: a scalar tensor, or a dict whose ``"loss"`` is minimised (the
        other entries are training metrics). The harness zeroes the gradients before, and runs backward
        and the optimizer step after. `batch_idx` counts global batches since training began (0-based);
        `epoch_idx` is the epoch that batch is in."""
        raise NotImplementedError

    @_optional
    def evaluate_batch(self, batch: Any, model: nn.Module) -> Metrics:
        """Metrics of one validation batch (weighted by its records, as ``validation_metrics``)."""
        raise NotImplementedError

    @_optional
    def evaluate_full_dataset(self, data_loader: Any, model: nn.Module) -> Metrics:
        """Metrics over the whole validation set, computed by rank 0 on the complete (unsharded) loader."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# Which API a trial class completes, told by the methods it defines.

COMMON = ("build_model", "optimizer")
# Each API: its name and what a class must define for it (a tuple inside means "one of these").
LOSSES_API = "losses/validation_metrics"
BATCH_API = "train_batch/evaluate_batch"
APIS: Dict[str, List[Any]] = {
    BATCH_API: [*COMMON, "train_batch", ("evaluate_batch", "evaluate_full_dataset")],
    LOSSES_API: [*COMMON, "losses", "validation_metrics"],
}


# Determined's API (harness/api/context.py): a trial made with a context, which builds its own loaders.
CONTEXT_API = "context (Determined)"  # wrap_model/wrap_optimizer; train_batch steps through the context
CONTEXT_MODEL_API = "context with build_model (Determined 0.12)"  # the harness runs backward and the step
CONTEXT_NEEDS: List[Any] = [
    "build_training_data_loader",
    "build_validation_data_loader",
    "train_batch",
    ("evaluate_batch", "evaluate_full_dataset"),
]


def is_trial_class(obj: Any) -> bool:
    """Whether `obj` is a trial class of any API (not one of the base classes themselves)."""
    return (
        inspect.isclass(obj)
        and issubclass(obj, (PyTorchTrial, ContextTrial))
        and obj not in (PyTorchTrial, ContextTrial)
    )


def _missing(cls: type, needs: List[Any]) -> List[str]:
    out = []
    for need in needs:
        names = need if isinstance(need, tuple) else (need,)
        if not any(defines(cls, n) for n in names):
            out.append(" or ".join(f"{n}()" for n in names))
    return out


def api_of(cls: type) -> str:
    """The trial API `cls` completes (PEDL's later one wins if both are complete), or one error naming,
    per API, what is missing."""
    if issubclass(cls, ContextTrial):
        return _context_api(cls)
    missing = {api: _missing(cls, needs) for api, needs in APIS.items()}
    for api, lacks in missing.items():
        if not lacks:
            if api == BATCH_API and defines(cls, "evaluate_batch") and defines(cls, "evaluate_full_dataset"):
                raise HarnessError(
                    f"{_where(cls)}: class {cls.__name__} defines both evaluate_batch() and "
                    "evaluate_full_dataset(); keep one"
                )
            return api
    parts = [f"the {api} API lacks {', '.join(lacks)}" for api, lacks in missing.items()]
    raise HarnessError(f"{_where(cls)}: class {cls.__name__} completes no trial API: {'; '.join(parts)}")


def _context_api(cls: type) -> str:
    old_form = defines(cls, "build_model") or defines(cls, "optimizer")
    lacks = _missing(cls, CONTEXT_NEEDS + (list(COMMON) if old_form else []))
    if lacks:
        raise HarnessError(
            f"{_where(cls)}: class {cls.__name__} (Determined's PyTorchTrial) lacks {', '.join(lacks)}"
        )
    if defines(cls, "evaluate_batch") and defines(cls, "evaluate_full_dataset"):
        raise HarnessError(
            f"{_where(cls)}: class {cls.__name__} defines both evaluate_batch() and "
            "evaluate_full_dataset(); keep one"
        )
    return CONTEXT_MODEL_API if old_form else CONTEXT_API


def _where(cls: type) -> str:
    try:
        return inspect.getsourcefile(cls) or cls.__module__
    except TypeError:
        return cls.__module__


# ----------------------------------------------------------------------------------------------------------
# What the running trial can ask for anywhere: set by the harness before user code runs.

_context: Dict[str, Any] = {"hparams": {}, "download_data_dir": None, "config": {}, "seed": None}


def get_hyperparameter(name: str) -> Any:
    """The value of hyperparameter `name` from the experiment config."""
    return hyperparameter(_context["hparams"], name)


def hyperparameter(hparams: Dict[str, Any], name: str) -> Any:
    """`hparams[name]`, or one line naming the hyperparameters there are."""
    try:
        return hparams[name]
    except KeyError:
        have = ", ".join(sorted(hparams)) or "none"
        raise HarnessError(
            f"hyperparameter '{name}' is not in the config's hyperparameters (have: {have})"
        ) from None


def get_hyperparameters() -> Dict[str, Any]:
    """Every hyperparameter of the running trial (a copy)."""
    return dict(_context["hparams"])


def get_experiment_config() -> Dict[str, Any]:
    """The effective experiment config, as plain data (what OUTPUT/config.yaml holds)."""
    return _context["config"]


def get_data_config() -> Dict[str, Any]:
    """The config's free-form ``data`` section."""
    return _context["config"].get("data") or {}


def get_trial_seed() -> int:
    """The seed of this trial (the experiment seed, drawn at start unless the config fixes it)."""
    if _context["seed"] is None:
        raise HarnessError("get_trial_seed() called before the harness started the trial")
    return int(_context["seed"])


def get_download_data_dir() -> str:
    """The directory that ``download_data`` returned on this machine."""
    if _context["download_data_dir"] is None:
        raise HarnessError("get_download_data_dir() called, but the model definition has no download_data()")
    return _context["download_data_dir"]


def _set_context(
    hparams: Dict[str, Any],
    download_data_dir: Optional[str],
    config: Optional[Dict[str, Any]] = None,
    seed: Optional[int] = None,
) -> None:
    _context.update(hparams=dict(hparams), download_data_dir=download_data_dir)
    if config is not None:
        _context["config"] = config
    if seed is not None:
        _context["seed"] = seed
