"""Work that rank 0 does alone (evaluate_full_dataset) while the other ranks wait without tripping Horovod's
stall checks or the harness's own watchdog."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional, Tuple

import torch

from harness.distributed import watchdog
from harness.distributed.backend import Backend
from harness.distributed.preemption import StopRequested
from harness.errors import PeerFailure, describe

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
    if backend.controller == "mpi":
        with _feeding(watch):
            mine, error = _attempt(fn) if backend.rank == 0 else (None, None)
            outcome = backend.broadcast_object(mine)
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


def _result(outcome: Optional[Tuple[str, Any]], error: Optional[BaseException]) -> Any:
    if error is not None:  # rank 0: its own exception
        raise error
    assert outcome is not None, "rank 0 broadcasts an outcome"
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
