"""The harness's `determined` package: what Determined trials import, mapped onto the harness.

Provided names are listed in `SUPPORTED`; any other name of Determined's is refused by name with that list,
at import or first use, instead of an ImportError deep in a traceback. This is not Determined: nothing here
talks to a cluster (`get_cluster_info()` is None, as it was off-cluster).
"""

from typing import Any, Dict, List, Optional

from harness.api.context import InvalidHP, TrialContext
from harness.errors import HarnessError

__version__ = "0.38.1+harness"  # the Determined release whose API this follows

SUPPORTED: Dict[str, List[str]] = {
    "determined": ["InvalidHP", "TrialContext", "get_cluster_info"],
    "determined.pytorch": [
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
        "load_trial_from_checkpoint_path",
        "reset_parameters",
    ],
    "determined.tensorboard.metric_writers.pytorch": ["TorchWriter"],
}


def supported_list() -> str:
    return "; ".join(f"{m}: {', '.join(names)}" for m, names in SUPPORTED.items())


class UnsupportedDeterminedName(HarnessError, AttributeError):
    """A Determined name this harness does not provide (an AttributeError too, so hasattr() works)."""


def refuse(module: str, name: str) -> UnsupportedDeterminedName:
    return UnsupportedDeterminedName(
        f"{module}.{name} is not provided by this harness's determined package "
        f"(it provides {supported_list()})"
    )


def get_cluster_info() -> Optional[Any]:
    """None: there is no Determined cluster here (Determined's own answer off-cluster)."""
    return None


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    raise refuse("determined", name)


__all__ = ["InvalidHP", "TrialContext", "get_cluster_info"]
