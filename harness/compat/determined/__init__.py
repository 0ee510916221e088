"""The harness's `determined` package: what Determined trials import, mapped onto the harness.

Provided names are listed in `SUPPORTED`; any other name of Determined's is refused by name with that list,
at import or first use, instead of an ImportError deep in a traceback. This is not Determined: nothing here
talks to a cluster (`get_cluster_info()` is None, as it was off-cluster).
"""

import os
import re
import sys
import traceback
from typing import Any, Dict, List, Optional

from harness.api.context import InvalidHP, TrialContext
from harness.errors import HarnessError

__version__ = "0.38.1+harness"  # the Determined release whose API this follows
LOG_FORMAT = "%(levelname)s: [%(process)s] %(name)s: %(message)s"  # for logging.basicConfig, as Determined's

SUPPORTED: Dict[str, List[str]] = {
    "determined": ["InvalidHP", "LOG_FORMAT", "TrialContext", "get_cluster_info"],
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
        "Trainer",
        "init",
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


def _excepthook(kind: Any, value: BaseException, tb: Any) -> None:
    """In a script run with python (a Trainer script): a name this package lacks, or a harness error
    outside the Trainer, ends the process with the harness's one line and status 2, not a traceback."""
    module = getattr(value, "name", None) or ""
    if isinstance(value, ImportError) and module.split(".")[0] == "determined":
        frames = traceback.extract_tb(tb)
        where = f"{frames[0].filename}:{frames[0].lineno}: " if frames else ""
        missing = re.search(r"cannot import name '([^']+)'", str(value))
        name = f"{module}.{missing.group(1)}" if missing else module
        message = f"{where}imports {name}, which is not {refuse(module, '').args[0].split(' is not ', 1)[1]}"
    elif isinstance(value, HarnessError):
        message = str(value)
    else:
        _previous_hook(kind, value, tb)
        return
    sys.stderr.write(f"harness: error: {message}\n")
    sys.stderr.flush()
    os._exit(HarnessError.exit_code)


_previous_hook = sys.excepthook
sys.excepthook = _excepthook


def get_cluster_info() -> Optional[Any]:
    """None: there is no Determined cluster here (Determined's own answer off-cluster)."""
    return None


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    raise refuse("determined", name)


__all__ = ["LOG_FORMAT", "InvalidHP", "TrialContext", "get_cluster_info"]
