"""Horovod/MPI: init, rank info, the data-download barrier, reductions; a one-process fallback.

`init()` returns a `Horovod` backend when the process runs under a launcher (horovodrun, mpirun) as one of
several ranks, and a `Local` one otherwise, so `harness ./model_def` works without MPI and unit tests need no
Horovod.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

from harness import watchdog
from harness.errors import PeerFailure, describe
from harness.preemption import StopRequested

_LAUNCHER_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def under_launcher() -> bool:
    """Whether a launcher (horovodrun, mpirun, an MPI operator) started this process as one of N ranks."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def env_rank() -> int:
    """This process's rank as the launcher's environment tells it, before any init (0 if none)."""
    for v in _LAUNCHER_VARS:
        if v in os.environ:
            return int(os.environ[v])
    return 0


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

    def __init__(self, controller: str = "none", hvd: Any = None):
        self.controller = controller
        self._hvd = hvd

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def allreduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def allgather_object(self, obj: Any) -> List[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, options: Any = None
    ) -> torch.optim.Optimizer:
        return optimizer  # aggregation happens in OptimizerStep; compression has nothing to compress

    def broadcast_model(self, model: torch.nn.Module) -> None:
        pass

    def start_vote(self, stop: bool, interval: int) -> Any:
        return stop, interval

    def finish_vote(self, handle: Any) -> Tuple[bool, int]:
        return handle[0], 1  # a vote costs nothing here: at every batch

    def shutdown(self) -> None:
        if self._hvd is not None:
            self._hvd.shutdown()


def _dumps(obj: Any) -> bytes:
    # torch.save, not pickle: Horovod's cloudpickle path cannot unpickle tensors on torch >= 2.x storages.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    # Objects from our own ranks (RNG states, optimizer state, small dicts), never from files.
    return torch.load(io.BytesIO(data), weights_only=False)


class Horovod:
    """Horovod's collectives; the MPI controller's barrier-like exchanges go through mpi4py."""

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

    def allgather_object(self, obj: Any) -> List[Any]:
        # Under MPI this is a plain MPI collective outside Horovod's background thread, so a long wait
        # (e.g. for a download on another rank) never trips Horovod's stall checks.
        if self._comm is not None:
            return [_loads(b) for b in self._comm.allgather(_dumps(obj))]
        return [_loads(b) for b in self.hvd.allgather_object(_dumps(obj), name="harness.gather")]

    def broadcast_object(self, obj: Any) -> Any:
        if self._comm is not None:
            return _loads(self._comm.bcast(_dumps(obj), root=0))
        return _loads(self.hvd.broadcast_object(_dumps(obj), root_rank=0, name="harness.bcast"))

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, options: Any = None
    ) -> torch.optim.Optimizer:
        """hvd.DistributedOptimizer; with aggregation k it allreduces once every k backward passes
        (OptimizerStep calls synchronize() at the end of each window), with compression in fp16."""
        hvd = self.hvd
        return hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            backward_passes_per_step=options.aggregation_frequency if options else 1,
            compression=hvd.Compression.fp16
            if options and options.gradient_compression
            else hvd.Compression.none,
        )

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
        self.hvd.shutdown()


Backend = Any  # Local | Horovod

# While rank 0 works alone, the ranks meet in a small allreduce this often: no collective stays pending
# long enough for Horovod's stall warning (HOROVOD_STALL_CHECK_TIME_SECONDS, 60 s by default).
HEARTBEAT_SECONDS = 2.0


def run_on_chief(backend: Backend, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only while the other ranks wait; every rank returns its result.

    The other ranks wait without tripping Horovod's stall warning. Under MPI they wait in a blocking
    broadcast outside Horovod (mpi4py), each rank's watchdog fed by a thread that makes no MPI call
    (polling a non-blocking MPI request beside Horovod's thread crashed Open MPI 4.1: MPI_Test segfaulted).
    Under Gloo they repeat a small heartbeat allreduce with a thread of rank 0 until rank 0 contributes
    "done", then receive the result by broadcast. If `fn` raises, rank 0 re-raises it and the others raise
    `PeerFailure` naming it.
    """
    if backend.size == 1:
        return fn()
    watch = watchdog.current()
    if getattr(backend, "_comm", None) is not None:
        with _feeding(watch):
            outcome, error = _attempt(fn) if backend.rank == 0 else ((None, None), None)
            outcome = backend.broadcast_object(outcome)
        return _result(outcome, error)
    if backend.rank != 0:
        while int(backend.allreduce_sum(torch.zeros(1, dtype=torch.int64)).item()) == 0:
            watch.beat()
        return _result(backend.broadcast_object(None), None)

    done = threading.Event()

    def heartbeat() -> None:
        while True:
            finished = done.wait(HEARTBEAT_SECONDS)
            backend.allreduce_sum(torch.tensor([int(finished)], dtype=torch.int64))
            watch.beat()  # rank 0's own code may take long here
            if finished:
                return

    beat = threading.Thread(target=heartbeat, name="harness-heartbeat", daemon=True)
    beat.start()
    try:
        outcome, error = _attempt(fn)
    finally:
        done.set()
        beat.join()
    backend.broadcast_object(outcome)
    return _result(outcome, error)


def _attempt(fn: Callable[[], Any]) -> Tuple[Tuple[str, Any], Optional[BaseException]]:
    """(what the other ranks learn, the exception to re-raise here)."""
    try:
        return ("ok", fn()), None
    except StopRequested as e:
        return ("stopped", str(e)), e
    except BaseException as e:  # noqa: BLE001 - passed on to the other ranks, then re-raised
        return ("error", describe(e)), e


def _result(outcome: Tuple[str, Any], error: Optional[BaseException]) -> Any:
    if error is not None:  # rank 0: its own exception
        raise error
    status, value = outcome
    if status == "error":
        raise PeerFailure(f"rank 0 failed while working alone: {value}")
    if status == "stopped":
        raise StopRequested(value)
    return value


@contextlib.contextmanager
def _feeding(watch: Any) -> Iterator[None]:
    """Beat the watchdog every HEARTBEAT_SECONDS while this rank waits or works alone (no MPI here)."""
    done = threading.Event()

    def feed() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            watch.beat()

    feeder = threading.Thread(target=feed, name="harness-feed", daemon=True)
    feeder.start()
    try:
        yield
    finally:
        done.set()
        feeder.join()


def init() -> Backend:
    """Start Horovod when a launcher started us; run as one local process when there is only one rank."""
    if not under_launcher():
        return Local()
    backend = Horovod()
    return backend if backend.size > 1 else Local(backend.controller, backend.hvd)


def torch_threads() -> int:
    return torch.get_num_threads()


def set_threads(backend: Backend, threads_before_user_code: Optional[int] = None) -> None:
    """Split the machine's cores among the ranks on it, so that they do not oversubscribe it; unless the user
    chose: OMP_NUM_THREADS in the environment, or torch.set_num_threads() in the model definition's code
    (the count differs from `threads_before_user_code`)."""
    if "OMP_NUM_THREADS" in os.environ:
        return  # torch took it at start
    if threads_before_user_code is not None and torch.get_num_threads() != threads_before_user_code:
        return
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // backend.local_size))
