"""Compatibility package: model definitions written for PEDL import from here and run unchanged.

What PEDL-era model definitions used is provided (`SUPPORTED`); anything else of PEDL's is refused by name
with that list, at import or at first use, instead of an ImportError deep in a traceback.
"""

from typing import Any

from harness.api.trial import (
    get_data_config,
    get_download_data_dir,
    get_experiment_config,
    get_hyperparameter,
    get_hyperparameters,
    get_trial_seed,
)
from harness.errors import HarnessError

# Every name of the `pedl` package this harness provides, by module.
SUPPORTED = {
    "pedl": [
        "get_data_config",
        "get_download_data_dir",
        "get_experiment_config",
        "get_hyperparameter",
        "get_hyperparameters",
        "get_trial_seed",
    ],
    "pedl.frameworks.pytorch": ["DataLoader", "LRScheduler", "PyTorchTrial", "TorchData", "reset_parameters"],
    "pedl.frameworks.pytorch.data": ["DataLoader", "TorchData"],
    "pedl.frameworks.pytorch.util": ["error_rate"],
}


def supported_list() -> str:
    return "; ".join(f"{m}: {', '.join(names)}" for m, names in SUPPORTED.items())


class UnsupportedPedlName(HarnessError, AttributeError):
    """A PEDL name this harness does not provide (an AttributeError too, so hasattr() still works)."""


def refuse(module: str, name: str) -> UnsupportedPedlName:
    return UnsupportedPedlName(
        f"{module}.{name} is not provided by this harness's pedl package (it provides {supported_list()})"
    )


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    raise refuse("pedl", name)


__all__ = [
    "get_data_config",
    "get_download_data_dir",
    "get_experiment_config",
    "get_hyperparameter",
    "get_hyperparameters",
    "get_trial_seed",
]
