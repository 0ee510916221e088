"""``pedl.frameworks.pytorch``: PyTorchTrial and helpers, as PEDL model definitions import them."""

from torch import nn

from harness.data import DataLoader
from harness.trial import PyTorchTrial


def reset_parameters(model: nn.Module) -> None:
    """Re-initialise every submodule that has a ``reset_parameters`` method (as PEDL's helper did)."""
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()


__all__ = ["DataLoader", "PyTorchTrial", "reset_parameters"]
