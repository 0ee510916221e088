"""Horovod-backed training harness for PEDL-style PyTorchTrial model definitions."""

from harness.data import DataLoader
from harness.errors import HarnessError
from harness.lr_scheduler import LRScheduler
from harness.trial import (
    PyTorchTrial,
    get_data_config,
    get_download_data_dir,
    get_experiment_config,
    get_hyperparameter,
    get_hyperparameters,
    get_trial_seed,
)

__all__ = [
    "DataLoader",
    "HarnessError",
    "LRScheduler",
    "PyTorchTrial",
    "get_data_config",
    "get_download_data_dir",
    "get_experiment_config",
    "get_hyperparameter",
    "get_hyperparameters",
    "get_trial_seed",
]
__version__ = "0.1.0"
