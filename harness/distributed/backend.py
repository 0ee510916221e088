"""The collectives the harness needs from a distributed backend, as one typed interface.

`Local` (one process), `Horovod` and `TorchDistributed` (torch_ddp.py) implement it. The loop,
the checkpoint code and the adapters see only this Protocol, so mypy checks every call against it.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Protocol, Tuple, TypeVar

import torch

if TYPE_CHECKING:
    from harness.config.optimizations import TrainingOptions

T = TypeVar("T")


class Backend(Protocol):
    """Rank information and the collectives of one job: every rank makes every call, in the same order."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    controller: str  # how the harness's own collectives travel: "none" (no launcher), "gloo" or "mpi"
    name: str  # "local", "horovod" or "torch"

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over the ranks."""

    def allreduce_min(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise minimum over the ranks."""

    def start_sum(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start `allreduce_sum(t)` and return what waits for it: the allreduce overlaps what the caller
        does meanwhile (a training report's, with the next batch). Other collectives may come in between."""

    def allgather_object(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order (a barrier: may wait long, e.g. for a download)."""

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (a barrier too)."""

    def wrap_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        options: Optional[TrainingOptions] = None,
        backward_passes: int = 1,
    ) -> torch.optim.Optimizer:
        """The optimizer whose gradients are averaged over the ranks (aggregation, compression: `options`);
        `backward_passes`: backward passes per batch (Determined's backward_passes_per_step)."""

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """Forward passes inside keep their gradients on this rank (an aggregation window's batches but the
        last: DDP's no_sync); nothing for backends whose optimizer counts the window itself (Horovod)."""

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Rank 0's weights and buffers into every rank's model."""

    def start_vote(self, stop: bool, interval: int) -> Any:
        """Start agreeing whether any rank wants to stop, and on the batches until the next vote."""

    def finish_vote(self, handle: Any) -> Tuple[bool, int]:
        """(any rank wants to stop, the agreed interval): the same on every rank."""

    def shutdown(self) -> None:
        """End the backend (Horovod's background thread); the last call."""


def dumps(obj: Any) -> bytes:
    # torch.save, not pickle: pickled tensors (RNG states) fail to unpickle on torch >= 2.x storages, under
    # Horovod's cloudpickle and torch.distributed's object collectives alike.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    # Objects from our own ranks (RNG states, optimizer state, small dicts), never from files.
    return torch.load(io.BytesIO(data), weights_only=False)
