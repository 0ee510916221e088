"""One process, no communication: the backend of a run without a launcher, or of a launcher's single rank."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, TypeVar

import torch

if TYPE_CHECKING:
    from harness.config.optimizations import TrainingOptions

T = TypeVar("T")


class Local:
    """One process, no communication: the collectives are identities.

    Also the backend of a launcher's single rank: Horovod is initialised (for user code that asks it), but
    a collective would only wait for its background thread's next cycle (~1 ms), and hvd's optimizer
    wrapper only adds work per step, so neither is used.
    """

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    cross_rank = 0
    name = "local"

    def __init__(self, controller: str = "none", hvd: Any = None):
        self.controller = controller
        self._hvd = hvd

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def allreduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def start_sum(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: t

    def allgather_object(self, obj: Any) -> List[Any]:
        return [obj]

    def broadcast_object(self, obj: T) -> T:
        return obj

    def wrap_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        options: Optional[TrainingOptions] = None,
        backward_passes: int = 1,
    ) -> torch.optim.Optimizer:
        return optimizer  # aggregation happens in OptimizerStep; compression has nothing to compress

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def broadcast_model(self, model: torch.nn.Module) -> None:
        pass

    def start_vote(self, stop: bool, interval: int) -> Any:
        return stop, interval

    def finish_vote(self, handle: Any) -> Tuple[bool, int]:
        return handle[0], 1  # a vote costs nothing here: at every batch

    def shutdown(self) -> None:
        if self._hvd is not None:
            self._hvd.shutdown()
