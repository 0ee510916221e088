"""The stall watchdog: a rank that makes no progress for `stall_timeout` seconds ends the job, naming where.

The loop calls `beat()` at every batch (and validation batch, and heartbeat while rank 0 works alone), and
`phase(...)` when it enters a phase of its own. Set-up (building the model, optimizer and data loaders) has
its own limit, `setup_timeout`: its steps are one-off and their length depends on the machine's load, so a
`stall_timeout` chosen for batches would end healthy jobs there. ``download_data`` has `download_timeout`.
A thread looks every second; past the limit it samples the main thread's stack:
- a rank stuck in user code (its innermost frames are the model definition's) ends the job at once with
  one line naming the rank, the phase and the user function and line;
- a rank waiting in a collective for another rank gives the stuck one GRACE_SECONDS to report first, then
  ends the job itself, naming what it waited in.

Horovod's own stall check (HOROVOD_STALL_CHECK_TIME_SECONDS, a multi-line warning after 60 s naming the
ranks that did not submit a tensor) is left as it is; its shutdown (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS) is
not used: it ends the job without saying which user code hung.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional, Tuple

GRACE_SECONDS = 15.0
STARTUP_SECONDS = 300.0
SETUP = "set-up"  # the phase from the end of start-up to the first batch
# Frames in these files mean "waiting for other ranks", not "stuck in the trial's code".
_WAITING_FILES = [
    os.sep + "horovod" + os.sep,
    os.sep + "mpi4py" + os.sep,
    os.sep + os.path.join("torch", "distributed") + os.sep,  # the torch backend's collectives
    os.sep + os.path.join("torch", "nn", "parallel") + os.sep,  # DDP's reducer
    os.sep + os.path.join("harness", "distributed", "torch_ddp.py"),  # its stop votes' wait()
    "distributed.py",
]


def waiting_also_in(marker: str) -> None:
    """Frames in files whose path contains `marker` mean waiting for other ranks too. Under DDP the backward
    pass waits for the gradients' allreduce inside autograd's engine, whose innermost Python frame is
    torch/autograd's: the torch backend adds it once it has attached DDP to a model."""
    if marker not in _WAITING_FILES:
        _WAITING_FILES.append(marker)


class Watchdog:
    def __init__(
        self,
        rank: int,
        stall_timeout: float,
        user_dir: str,
        on_stall: Callable[[str, bool], None],
        poll_seconds: float = 1.0,
        setup_timeout: Optional[float] = None,
    ):
        self.rank = rank
        self.default_limit = stall_timeout
        self.phase_limits = {SETUP: setup_timeout if setup_timeout is not None else stall_timeout}
        self.user_dir = os.path.abspath(user_dir) + os.sep
        self.on_stall = on_stall  # (message, consequential): prints it and ends the process
        # Start-up (imports, hvd.init's rendezvous with every rank of every host) gets a longer limit;
        # the loop's first phase() sets stall_timeout.
        self.what = "start-up"
        self.limit = max(stall_timeout, STARTUP_SECONDS)
        self.last = time.monotonic()
        self._main = threading.main_thread().ident
        self._poll = poll_seconds
        self._disarmed = False
        self._thread = threading.Thread(target=self._watch, name="harness-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """Progress: called per batch, so it only stores a number."""
        self.last = time.monotonic()

    def phase(self, what: str, limit: Optional[float] = None) -> None:
        """Enter a phase (named in the message); `limit` (else the phase's own, set-up's setup_timeout)
        replaces stall_timeout until the next phase."""
        self.what = what
        self.limit = limit if limit is not None else self.phase_limits.get(what, self.default_limit)
        self.last = time.monotonic()

    def disarm(self) -> None:
        """The process is ending on its own (an error being reported): no stall report on top of it."""
        self._disarmed = True

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll)
            if self._disarmed:
                return
            idle = time.monotonic() - self.last
            if idle < self.limit:
                continue
            where, waiting = self.sample()
            if waiting and idle < self.limit + GRACE_SECONDS:
                continue  # the rank we wait for reports first, if it can
            if waiting:
                message = (
                    f"no progress for {idle:.0f} s in {self.what}: waiting for another rank ({where}); "
                    "that rank is stuck or gone"
                )
            else:
                message = f"no progress for {idle:.0f} s in {self.what}: stuck in {where}"
            self.on_stall(f"{message} (stall_timeout {self.limit:g} s)", waiting)
            return

    def sample(self) -> Tuple[str, bool]:
        """(where the main thread is, whether it waits in a collective) from a stack sample."""
        frame = sys._current_frames().get(self._main) if self._main is not None else None
        innermost, user = None, None
        while frame is not None:
            code = frame.f_code
            here = f"{code.co_name}() at {code.co_filename}:{frame.f_lineno}"
            innermost = innermost or (code.co_filename, here)
            if user is None and os.path.abspath(code.co_filename).startswith(self.user_dir):
                user = here
            frame = frame.f_back
        if innermost is None:
            return "an unknown place", False
        waiting = any(part in innermost[0] for part in _WAITING_FILES)
        if waiting:
            return innermost[1], True
        return user or innermost[1], False


class _Idle:
    """The watchdog when none runs (unit tests, library use): every call does nothing."""

    def beat(self) -> None:
        pass

    def phase(self, what: str, limit: Optional[float] = None) -> None:
        pass

    def disarm(self) -> None:
        pass


_current: Watchdog | _Idle = _Idle()


def current() -> Watchdog | _Idle:
    return _current


def start(
    rank: int,
    stall_timeout: float,
    user_dir: str,
    on_stall: Callable[[str, bool], None],
    setup_timeout: Optional[float] = None,
) -> Watchdog:
    global _current
    _current = Watchdog(rank, stall_timeout, user_dir, on_stall, setup_timeout=setup_timeout)
    return _current
