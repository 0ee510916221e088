"""Horovod-backed training harness for PEDL-style PyTorchTrial model definitions.

The user API is imported on first use (PEP 562), so that the `harness` command's subcommands that need no
torch (`--help`, `launch`, `summary`) start at once.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DataLoader": "harness.api.data",
    "HarnessError": "harness.errors",
    "LRScheduler": "harness.api.lr_scheduler",
    "PyTorchTrial": "harness.api.trial",
    "get_data_config": "harness.api.trial",
    "get_download_data_dir": "harness.api.trial",
    "get_experiment_config": "harness.api.trial",
    "get_hyperparameter": "harness.api.trial",
    "get_hyperparameters": "harness.api.trial",
    "get_trial_seed": "harness.api.trial",
    "load_trial": "harness.results.evaluate",
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
