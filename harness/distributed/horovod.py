"""Horovod's collectives (Gloo or MPI controller); the MPI controller's barrier-like exchanges use mpi4py."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, TypeVar

import torch

from harness.distributed.backend import dumps as _dumps
from harness.distributed.backend import loads as _loads

if TYPE_CHECKING:
    from harness.config.optimizations import TrainingOptions

T = TypeVar("T")


class Horovod:
    """Horovod's collectives; the MPI controller's barrier-like exchanges go through mpi4py."""

    name = "horovod"
    PEERS_WAIT = (
        60.0  # seconds `shutdown` waits for the other ranks; they arrive together after the last broadcast
    )

    def __init__(self) -> None:
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        self.cross_rank = hvd.cross_rank()
        self.controller = "mpi" if hvd.mpi_enabled() else "gloo"
        self._comm: Optional[Any] = None
        if self.controller == "mpi":
            from mpi4py import MPI  # MPI is initialised by Horovod; mpi4py attaches to it

            self._comm = MPI.COMM_WORLD

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(t, op=self.hvd.Sum, name="harness.sum")

    def allreduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(t, op=self.hvd.Min, name="harness.min")

    def start_sum(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        # A name of its own: a synchronous "harness.sum" may be issued while this one is in flight.
        handle = self.hvd.allreduce_async(t, op=self.hvd.Sum, name="harness.started_sum")
        return lambda: self.hvd.synchronize(handle)

    def allgather_object(self, obj: Any) -> List[Any]:
        # Under MPI this is a plain MPI collective outside Horovod's background thread, so a long wait
        # (e.g. for a download on another rank) never trips Horovod's stall checks.
        if self._comm is not None:
            return [_loads(b) for b in self._comm.allgather(_dumps(obj))]
        return [_loads(b) for b in self.hvd.allgather_object(_dumps(obj), name="harness.gather")]

    def broadcast_object(self, obj: T) -> T:
        if self._comm is not None:
            return _loads(self._comm.bcast(_dumps(obj), root=0))
        return _loads(self.hvd.broadcast_object(_dumps(obj), root_rank=0, name="harness.bcast"))

    def wrap_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        options: Optional[TrainingOptions] = None,
        backward_passes: int = 1,
    ) -> torch.optim.Optimizer:
        """hvd.DistributedOptimizer; with aggregation k it allreduces once every k backward passes
        (OptimizerStep calls synchronize() at the end of each window), with compression in fp16."""
        hvd = self.hvd
        return hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            backward_passes_per_step=(options.aggregation_frequency if options else 1) * backward_passes,
            compression=hvd.Compression.fp16
            if options and options.gradient_compression
            else hvd.Compression.none,
        )

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return (
            contextlib.nullcontext()
        )  # hvd.DistributedOptimizer counts the window (backward_passes_per_step)

    def broadcast_model(self, model: torch.nn.Module) -> None:
        # Optimizer state is not broadcast with hvd.broadcast_optimizer_state: on a fresh optimizer that
        # takes a dummy step (weight decay moves the weights, Adam's step count becomes 1), which would
        # make np=1 and np=N differ. A fresh optimizer is the same everywhere; a resumed one is
        # broadcast by the loop.
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def start_vote(self, stop: bool, interval: int) -> Any:
        """Start agreeing on "does any rank want to stop?" and on the batches until the next vote (each rank
        proposes an interval); it overlaps with the batch's computation."""
        vote = torch.tensor([int(stop), interval], dtype=torch.int64)  # integers: every rank sums alike
        return self.hvd.allreduce_async(vote, op=self.hvd.Sum, name="harness.vote")

    def finish_vote(self, handle: Any) -> Tuple[bool, int]:
        """(any rank wants to stop, the mean proposed interval): the same on every rank."""
        stops, intervals = self.hvd.synchronize(handle).tolist()
        return stops > 0, max(1, intervals // self.size)

    def shutdown(self) -> None:
        # Under the MPI controller one rank's hvd.shutdown() reaches every rank's background thread, which
        # then finalizes MPI at once. A rank whose main thread was still inside an mpi4py collective (the
        # last broadcast: its root returns early) crashed there, status 139 after the run had ended (3 runs
        # in 28 on a 2-core machine). So the ranks first meet in a collective of Horovod's own.
        if self._comm is not None:
            self._meet_peers(self.PEERS_WAIT)
        self.hvd.shutdown()

    def _meet_peers(self, seconds: float) -> None:
        """A barrier through Horovod's thread: once it completes every rank's main thread has left MPI, and
        this one waits on a handle, not inside MPI. Bounded: a rank that never comes (the user's code
        called sys.exit() on one rank of a Trainer script) must not hang this one; nor does it hang when a
        peer has already shut Horovod down."""
        hvd = self.hvd
        try:
            handle = hvd.allreduce_async(torch.zeros(1), op=hvd.Sum, name="harness.shutdown")
            deadline = time.monotonic() + seconds
            while not hvd.poll(handle):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.002)
            hvd.synchronize(handle)
        except (RuntimeError, ValueError):  # Horovod already shut down by a peer: nobody left to meet
            return
