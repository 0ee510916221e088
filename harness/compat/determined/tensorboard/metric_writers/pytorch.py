"""``TorchWriter``: a TensorBoard ``SummaryWriter`` (``.writer``) writing into the run's output folder."""

import os
from typing import Any

from harness.api.trial import get_experiment_config


class TorchWriter:
    """``self.writer`` is a ``torch.utils.tensorboard.SummaryWriter`` on rank 0, into
    OUTPUT/tensorboard/trial (beside the harness's own event files); on the other ranks its calls do nothing,
    so that every rank can log as Determined's trials did."""

    def __init__(self) -> None:
        rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
        output = os.environ.get("HARNESS_OUTPUT_DIR")
        if rank != 0 or not output:
            self.writer: Any = _Silent()
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(output, "tensorboard", "trial"))
        self.config = get_experiment_config()


class _Silent:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
