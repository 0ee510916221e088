"""``pedl.frameworks.pytorch.data``: the DataLoader drop-in and the TorchData type."""

from typing import Dict, Sequence, Union

import numpy as np
import torch

from harness.api.data import DataLoader

# What a batch's input or target may be (PEDL's alias): tensors or arrays, or containers of them.
TorchData = Union[Dict[str, torch.Tensor], Sequence[torch.Tensor], torch.Tensor, np.ndarray]

__all__ = ["DataLoader", "TorchData"]
