"""``pedl.frameworks.pytorch``: PyTorchTrial, LRScheduler and helpers, as PEDL definitions import them."""

from typing import Any

from torch import nn

import pedl
from harness.api.data import DataLoader
from harness.api.lr_scheduler import LRScheduler
from harness.api.trial import PyTorchTrial
from pedl.frameworks.pytorch.data import TorchData


def reset_parameters(model: nn.Module) -> None:
    """Re-initialise every submodule that has a ``reset_parameters`` method (as PEDL's helper did)."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not model and callable(reset):
            reset()


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    raise pedl.refuse(__name__, name)


__all__ = ["DataLoader", "LRScheduler", "PyTorchTrial", "TorchData", "reset_parameters"]
