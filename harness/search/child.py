"""A trial's process, owned by the search that starts it.

The trial (`harness launch`, in a session of its own so that a Ctrl-C reaches only the search) is started
through a few lines of Python that ask the kernel for SIGTERM when the search dies (PR_SET_PDEATHSIG), then
exec it: a search killed with SIGKILL stops its trials as SIGTERM does (`harness launch` passes it on to
every rank, which checkpoint at an agreed batch and exit), instead of leaving them to train on as orphans.
Its output goes to its console.log, not through a pipe to the search, so that a trial that outlives its
search still writes it; the search follows the file.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

from harness.output.lock import LOCK_FILE

# argv: the search's pid, then the command. The signal is sent when the thread that started the process
# ends (a search's worker thread waits for its trial, so in practice when the search process dies).
_OWNED = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass  # not Linux: the trial then outlives a killed search
if os.getppid() != int(sys.argv[1]):
    sys.exit("harness search: the search ended before its trial started")
os.execv(sys.argv[2], sys.argv[2:])
"""

POLL_SECONDS = 0.2
_TAG = re.compile(r"^\[\d+(,\d+)?\]<std(out|err)>:")  # a launcher's rank tag


def start(command: List[str], env: Dict[str, str], log_path: str) -> subprocess.Popen:
    """Start the trial's command, its output appended to `log_path`; it gets SIGTERM if the search dies."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", _OWNED, str(os.getpid()), *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches the search, which stops the trials in order
        )


def follow(proc: subprocess.Popen, log_path: str, offset: int, say: Callable[[str], None]) -> str:
    """Follow what the trial appends to its console.log after `offset` until it ends: `say` its validations;
    returns its last error line."""
    last_error = ""

    def on_line(raw: str) -> None:
        nonlocal last_error
        line = _TAG.sub("", raw).rstrip()
        if line.startswith("[validation]"):  # "[validation] batch 40  epoch 1.74  accuracy 0.88 ..."
            parts = line.split()
            say(f"validation at batch {parts[2]}: {' '.join(parts[5:])}")
        elif "harness: error:" in line or line.startswith("harness launch: giving up"):
            last_error = line.split("error: ", 1)[-1] if "error: " in line else line
        elif line.startswith("harness launch: not restarting:"):
            last_error = line.split("not restarting: ", 1)[1]

    _lines(proc, log_path, offset, on_line)
    return last_error


def _lines(proc: subprocess.Popen, log_path: str, offset: int, on_line: Callable[[str], None]) -> None:
    """Call `on_line` with each line appended to the file after `offset`, until `proc` has ended."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        partial = b""
        while True:
            ended = proc.poll() is not None  # before reading: what it wrote before it ended is read now
            chunk = f.read()
            if chunk:
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    on_line(line.decode(errors="replace"))
            elif ended:
                if partial:
                    on_line(partial.decode(errors="replace"))
                return
            else:
                time.sleep(POLL_SECONDS)


def holder(folder: str) -> Optional[str]:
    """Who holds the run lock of a trial's folder ("pid P on HOST"), or None when it is free."""
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        import json

        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            record = {}
        return f"pid {record.get('pid', '?')} on {record.get('host', '?')}"
    finally:
        os.close(fd)  # (drops the probe's lock, if it got it)
    return None


def wait_until_free(folder: str, seconds: float, on_wait: Callable[[str], None]) -> Optional[str]:
    """Wait until no run holds the trial's folder (the run of a killed search stops with a checkpoint, which
    takes a while); returns the holder if it still holds it after `seconds`, else None."""
    who = holder(folder)
    if who is None:
        return None
    on_wait(who)
    deadline = time.monotonic() + seconds
    while who is not None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        who = holder(folder)
    return who
