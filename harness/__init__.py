"""Horovod-backed training harness for PEDL-style PyTorchTrial model definitions."""

from harness.data import DataLoader
from harness.errors import HarnessError
from harness.trial import PyTorchTrial, get_download_data_dir, get_hyperparameter

__all__ = ["DataLoader", "HarnessError", "PyTorchTrial", "get_download_data_dir", "get_hyperparameter"]
__version__ = "0.1.0"
