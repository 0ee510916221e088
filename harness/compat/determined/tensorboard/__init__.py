"""``determined.tensorboard``: only the PyTorch metric writer (``metric_writers.pytorch.TorchWriter``)."""

from typing import Any

from .. import refuse


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name == "metric_writers":
        raise AttributeError(name)
    raise refuse(__name__, name)
