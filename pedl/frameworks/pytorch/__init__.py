"""``pedl.frameworks.pytorch``: PyTorchTrial, LRScheduler and helpers, as PEDL definitions import them."""

from typing import Any

from torch import nn

import pedl
from harness.data import DataLoader
from harness.lr_scheduler import LRScheduler
from harness.trial import PyTorchTrial
from pedl.frameworks.pytorch.data import TorchData


def reset_parameters(model: nn.Module) -> None:
    """Re-initialise every submodule that has a ``reset_parameters`` method (as PEDL's helper did)."""
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    raise pedl.refuse(__name__, name)


__all__ = ["DataLoader", "LRScheduler", "PyTorchTrial", "TorchData", "reset_parameters"]
