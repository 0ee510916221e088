"""One run per output directory: an exclusive lock on OUTPUT/.lock for the run's life.

The lock is an ``flock`` on the file, so the kernel drops it when its holder dies, however it dies; the
file's content (pid, host, time) names the holder in the message a second run gets. `harness launch` holds
the lock for its whole life and tells its ranks (HARNESS_OUTPUT_LOCK_HOLDER) that it holds it for them.

Under torchrun's elastic agent each membership change starts new ranks, and rank 0 may move to another
machine: the record names the job (TORCHELASTIC_RUN_ID, torchrun's --rdzv-id), and a rank 0 of the same job
that finds the lock still held waits for the previous worker to let go (up to JOB_WAIT_SECONDS) instead of
refusing: on shared storage such as NFS a lost machine's lock outlives it until the server's lease expires.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional

from harness.errors import HarnessError, say

LOCK_FILE = ".lock"
HOLDER_ENV = "HARNESS_OUTPUT_LOCK_HOLDER"  # set by `harness launch` for its ranks: the pid holding the lock
JOB_ENV = "TORCHELASTIC_RUN_ID"  # torchrun's job id (--rdzv-id): the same job across its elastic restarts
JOB_WAIT_SECONDS = 120.0  # NFSv4's default lease is 90 s: a lost client's lock is gone by then


class LockRefused(HarnessError):
    """Another run holds the output directory."""


def no_space(e: OSError, path: Optional[str]) -> Optional[HarnessError]:
    """ENOSPC (or a quota) as bad input, status 2, naming what was written: `harness launch` does not retry
    it, as a full disk is not emptied by a restart seconds later. None for any other error."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = e.filename or path
    return HarnessError(f"no space left on device writing {where}" if where else "no space left on device")


_held: List[OutputLock] = []  # this process's locks, for release_held()


def release_held() -> None:
    """Release this process's locks before it exits with an error line of its own (`cli._fail`): that is a
    clean end too, and the next run should not report a lock "left by a run which no longer runs"."""
    for lock in list(_held):
        lock.release()


def holder_value(record: dict) -> Optional[str]:
    """HOLDER_ENV's value for the holder in `record`: pid and host, as the ranks may run on other machines."""
    return f"{record['pid']}@{record.get('host')}" if record.get("pid") else None


class OutputLock:
    """Held from `acquire` until the process exits (or `release`)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd: Optional[int] = None
        self.holder = f"{os.getpid()}@{socket.gethostname()}"  # HOLDER_ENV's value while this one holds it

    def acquire(self, job_wait: Optional[float] = None) -> Optional[str]:
        """Take the lock or raise a HarnessError naming its holder; returns a note if a dead run's lock
        was taken over (None otherwise). A holder of the same torchrun job (JOB_ENV) is waited for, up to
        `job_wait` seconds (default JOB_WAIT_SECONDS)."""
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise no_space(e, self.path) or e from None
        previous = _read(fd)
        if holder_value(previous) and os.environ.get(HOLDER_ENV) == holder_value(previous):
            os.close(fd)  # our supervisor holds it for us
            return None
        if not _lock(fd, previous, JOB_WAIT_SECONDS if job_wait is None else job_wait, self.path):
            os.close(fd)
            same_job = " (an earlier worker of this job, waited for in vain)" if _same_job(previous) else ""
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(previous.get("time", 0)))
            raise LockRefused(
                f"output directory {os.path.dirname(self.path)} is in use by another run (pid "
                f"{previous.get('pid', '?')} on {previous.get('host', '?')}, since {since}){same_job}; "
                "wait for it to end, or use another --output"
            ) from None
        record: Dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        if os.environ.get(JOB_ENV):
            record["job"] = os.environ[JOB_ENV]
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise no_space(e, self.path) or e from None
        self._fd = fd
        _held.append(self)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            return (
                f"took over the lock of {os.path.dirname(self.path)} left by pid {previous['pid']} on "
                f"{previous.get('host', '?')}, which no longer runs"
            )
        return None

    def release(self) -> None:
        """A clean end: the next run finds the lock free and unclaimed (a crashed holder's stays named)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing drops the flock
                self._fd = None
                if self in _held:
                    _held.remove(self)


def _same_job(previous: Dict[str, Any]) -> bool:
    """Whether the lock's record names this process's torchrun job (an earlier worker of it)."""
    job = os.environ.get(JOB_ENV)
    return bool(job) and previous.get("job") == job


def _lock(fd: int, previous: Dict[str, Any], job_wait: float, path: str) -> bool:
    """flock `fd`; when an earlier worker of the same torchrun job holds it, wait up to `job_wait` s for
    it (said once). Whether the lock is ours."""
    deadline, said = time.monotonic() + job_wait, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not _same_job(previous) or time.monotonic() >= deadline:
                return False
        if not said:
            say(
                f"harness: waiting up to {job_wait:.0f} s for the earlier worker of job {previous['job']} "
                f"(pid {previous.get('pid', '?')} on {previous.get('host', '?')}) to let go of {path}",
                sys.stderr,
            )
            said = True
        time.sleep(0.2)


def _read(fd: int) -> Dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}
