"""Horovod-backed training harness for PEDL-style PyTorchTrial model definitions.

The user API is imported on first use (PEP 562), so that the `harness` command's subcommands that need no
torch (`--help`, `launch`, `summary`) start at once.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DataLoader": "harness.data",
    "HarnessError": "harness.errors",
    "LRScheduler": "harness.lr_scheduler",
    "PyTorchTrial": "harness.trial",
    "get_data_config": "harness.trial",
    "get_download_data_dir": "harness.trial",
    "get_experiment_config": "harness.trial",
    "get_hyperparameter": "harness.trial",
    "get_hyperparameters": "harness.trial",
    "get_trial_seed": "harness.trial",
    "load_trial": "harness.evaluate",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
