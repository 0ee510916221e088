"""``determined.pytorch``: Determined's PyTorchTrial API, run by the harness (harness/api/context.py)."""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from harness.api.context import (
    ClipGradsL2Norm,
    ClipGradsL2Value,
    MetricReducer,
    PyTorchCallback,
    PyTorchTrialContext,
)
from harness.api.context import ContextTrial as PyTorchTrial
from harness.api.data import DataLoader
from harness.api.lr_scheduler import LRScheduler

from .. import refuse

TorchData = Union[Dict[str, torch.Tensor], Sequence[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """A training length in batches (``Trainer.fit(max_length=Batch(100))``)."""

    value: int
    unit = "batches"


@dataclass(frozen=True)
class Epoch:
    """A training length in epochs."""

    value: int
    unit = "epochs"


@dataclass(frozen=True)
class Record:
    """A training length in records."""

    value: int
    unit = "records"


def reset_parameters(model: nn.Module) -> None:
    """Re-initialise every submodule that has a ``reset_parameters`` method (as Determined's helper did)."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not model and callable(reset):
            reset()


def load_trial_from_checkpoint_path(path: str, trial_class: Optional[Any] = None, **kwargs: Any) -> Any:
    """The trial of a harness checkpoint, its models holding the checkpoint's weights (on the CPU), as
    Determined's function returned it. `trial_class` is accepted and checked against the checkpoint's."""
    from harness.results.evaluate import load_trial

    trial, _ = load_trial(path, kwargs.get("model_dir"))
    if trial_class is not None and not isinstance(trial, trial_class):
        raise refuse("determined.pytorch", f"load_trial_from_checkpoint_path(trial_class={trial_class})")
    return trial


def init(**kwargs: Any) -> Any:
    """``with pytorch.init() as context:`` in a Trainer script (harness/trainer.py)."""
    from harness.trainer import init as start

    return start(**kwargs)


def __getattr__(name: str) -> Any:
    if name == "Trainer":  # harness/trainer.py, imported when a script asks for it
        from harness.trainer import Trainer

        return Trainer
    if name.startswith("__"):
        raise AttributeError(name)
    raise refuse(__name__, name)


# The same names as SUPPORTED["determined.pytorch"] (tests/unit/test_determined_api.py checks it).
__all__ = [
    "Batch",
    "ClipGradsL2Norm",
    "ClipGradsL2Value",
    "DataLoader",
    "Epoch",
    "LRScheduler",
    "MetricReducer",
    "PyTorchCallback",
    "PyTorchTrial",
    "PyTorchTrialContext",
    "Record",
    "TorchData",
    "Trainer",
    "init",
    "load_trial_from_checkpoint_path",
    "reset_parameters",
]
