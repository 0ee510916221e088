"""``TorchWriter``: a TensorBoard ``SummaryWriter`` (``.writer``) writing into the run's output folder."""

import os
from typing import Any, Optional


class TorchWriter:
    """``self.writer`` acts as a ``torch.utils.tensorboard.SummaryWriter`` on rank 0, into
    OUTPUT/tensorboard/trial (beside the harness's own event files); on the other ranks, and outside a run,
    its calls do nothing, so that every rank can log as Determined's trials did. The writer opens its file
    on first use: a trial makes it in ``__init__``, before the harness has prepared the output folder."""

    def __init__(self) -> None:
        rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
        output = os.environ.get("HARNESS_OUTPUT_DIR")
        self.writer: Any = (
            _Lazy(os.path.join(output, "tensorboard", "trial")) if rank == 0 and output else _Silent()
        )


class _Lazy:
    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._writer: Optional[Any] = None

    def __getattr__(self, name: str) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self._directory)
        return getattr(self._writer, name)


class _Silent:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
