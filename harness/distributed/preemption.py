"""Stopping at a batch boundary on every rank: on SIGTERM (docker stop, cluster preemption), SIGUSR1,
Ctrl-C (SIGINT), or when the launcher that started the rank is gone.

The handler only raises a flag. Every ~50 ms of training the ranks agree whether any of them wants to
stop (a small allreduce that overlaps a batch's work), then all checkpoint at the same batch and exit:
0 after SIGTERM/SIGUSR1 or a lost launcher, 130 after Ctrl-C. A second Ctrl-C aborts at once.

A rank whose launcher (horovodrun, mpirun and its daemons, `harness launch`) dies would otherwise train on
as an orphan: a thread watches those ancestors and asks for the same agreed stop; if the ranks cannot agree
within ORPHAN_EXIT_SECONDS (the others are gone too), the rank exits anyway.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    from harness.distributed.backend import Backend

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Substrings of an ancestor's command line that make it a launcher worth watching.
LAUNCHER_MARKS = (
    "horovodrun",
    "mpirun",
    "mpiexec",
    "orterun",
    "prterun",
    "orted",
    "prted",
    "harness launch",
    "torchrun",
    "torch.distributed.run",
)
ORPHAN_EXIT_SECONDS = 30.0


# The last stop signal this process received (read by the CLI: a rank that the launcher is already
# stopping does not add a consequential error line to the root cause's).
received: Optional[str] = None


class StopRequested(BaseException):
    """Raised inside user code that runs long on its own (download_data, evaluate_full_dataset) when a stop
    is requested there; a BaseException, so that the user's ``except Exception`` does not swallow it."""


class StopSignals:
    """Whether a stop was asked for (a signal, a lost launcher, `request`): the handlers only raise a flag."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self.exit_code = 0
        self._interruptible = False
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        global received
        received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            if self.exit_code == 130:
                raise KeyboardInterrupt  # a second Ctrl-C: abort now, no checkpoint
            self.exit_code = 130
        self.signal_name = signal.Signals(signum).name
        if self._interruptible:
            self._interruptible = False
            raise StopRequested(self.signal_name)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within this block a stop signal raises StopRequested at once (in the main thread)."""
        if self.requested:
            raise StopRequested(self.signal_name)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def request(self, why: str) -> None:
        """Ask for the agreed stop from code (not a signal): `why` is said in the stop's message."""
        if self.signal_name is None:
            self.signal_name = why

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore_defaults(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)

    def watch_launchers(self, poll_seconds: float = 1.0) -> List[Tuple[int, str]]:
        """Start watching this process's launcher ancestors; returns them (pid, name)."""
        watched = launcher_ancestors()
        if watched:
            threading.Thread(
                target=self._watch, args=(watched, poll_seconds), name="harness-orphan", daemon=True
            ).start()
        return watched

    def _watch(self, watched: List[Tuple[int, str]], poll_seconds: float) -> None:
        while True:
            time.sleep(poll_seconds)
            gone = [(pid, name) for pid, name in watched if not _alive(pid)]
            if gone:
                pid, name = gone[0]
                self.request(f"the exit of its launcher ({name}, pid {pid})")
                time.sleep(ORPHAN_EXIT_SECONDS)  # the agreed stop normally ends the process before this
                sys.stderr.write(
                    f"harness: error: launcher {name} (pid {pid}) is gone and the ranks did not agree on "
                    f"a stop within {ORPHAN_EXIT_SECONDS:.0f} s; exiting without a checkpoint\n"
                )
                sys.stderr.flush()
                os._exit(1)


def _proc(pid: int) -> Tuple[str, int, str]:
    """(command line, parent pid, state) of a process, from /proc."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return cmdline, int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    try:
        return _proc(pid)[2] not in ("Z", "X")  # a zombie is dead, only not yet reaped
    except (OSError, IndexError, ValueError):
        return False


def launcher_ancestors() -> List[Tuple[int, str]]:
    """The ancestors of this process whose command line names a launcher (empty without /proc)."""
    found, pid = [], os.getppid()
    while pid > 1:
        try:
            cmdline, parent, _ = _proc(pid)
        except (OSError, IndexError, ValueError):
            break
        mark = next((m for m in LAUNCHER_MARKS if m in cmdline), None)
        if mark:
            found.append((pid, mark))
        pid = parent
    return found


class StopVotes:
    """Agreeing on a stop (SIGTERM/SIGUSR1 reach ranks at different times; all must stop at one batch).

    A vote is a two-number allreduce (stop?, proposed interval) that overlaps a batch. Voting at every batch
    would cost a collective per batch, which shows on fast steps; instead each vote also fixes the batch of
    the next one, so that votes are about VOTE_SECONDS apart (every batch once batches take longer). A vote
    is cheap but not free: starting one took 0.15-0.3 ms of the main thread at two ranks on 2 cores
    (bench/findings.md §9), so 20 a second cost ~0.5% of the MLP's 1.2 ms steps; 10 a second halve that
    and still agree on a stop well inside plain mpirun's 1 s before it kills.
    """

    VOTE_SECONDS = 0.1

    def __init__(self, backend: Backend, batches: int):
        self.backend = backend
        self.next_at = batches + 1  # global batch number that carries the next vote
        self.last = (batches, time.perf_counter())  # (batches done, time) at the last vote's start

    def start(self, batches: int, stop: bool, window_end: bool = True) -> Any:
        """Start a vote if batch `batches + 1` carries one (None otherwise). Under gradient aggregation a
        vote waits for the last batch of a window (`window_end`), whose allreduce cycle it then shares,
        instead of costing a cycle of its own in a batch that communicates nothing."""
        if batches + 1 < self.next_at or not window_end:
            return None
        now, (before, then) = time.perf_counter(), self.last
        self.last = (batches, now)
        interval = 1  # until a batch has been timed
        if batches > before:
            step_s = (now - then) / (batches - before)
            interval = int(min(1000, max(1, self.VOTE_SECONDS / max(step_s, 1e-6))))
        return self.backend.start_vote(stop, interval)

    def finish(self, handle: Any, batches: int) -> bool:
        """After batch `batches`: whether every rank stops here."""
        if handle is None:
            return False
        stopping, interval = self.backend.finish_vote(handle)
        self.next_at = batches + interval
        return stopping
