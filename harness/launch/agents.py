"""`python -m harness.launch.agents [--elastic] [--watch-stdin] JSON`: runs the torchrun agents of one job
(JSON: a list of argv lists; an agent on another machine is an ssh command) as one launcher for `harness
launch`: their output is its output, SIGTERM/SIGINT go on to each, and it exits when they have.

Exit status: without --elastic, the first non-zero status of any agent (one failed machine fails the job, as
under horovodrun: the other agents get SIGTERM); with --elastic, the first agent's (the rendezvous host: the
job lives while it does; another machine's agent may end, and join again, without ending the job).

--watch-stdin (the remote side of an ssh command): stdin is the ssh connection; at its end (harness launch
or its machine gone) the agent gets SIGTERM, which torchrun passes on to its ranks. Without it, a torchrun
whose ssh connection closed would run on, its ranks waiting for the others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

STOP_SECONDS = 60.0  # after SIGTERM, how long the agents get (their ranks checkpoint) before SIGKILL


def _signal(procs: List[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except OSError:
                pass


def run(commands: List[List[str]], elastic: bool, watch_stdin: bool) -> int:
    """Start every command and wait for all of them; see the module's docstring. They stay in this process's
    group: harness launch's SIGKILL to the launcher's group reaches them (torchrun's ranks have sessions of
    their own; harness launch signals those on its machine itself)."""
    stopping: List[float] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(time.monotonic())
        _signal(procs, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs: List[subprocess.Popen] = []
    for command in commands:
        try:
            # stdin: a pipe never written, so that an ssh agent's remote side sees EOF only when we end.
            procs.append(subprocess.Popen(command, stdin=subprocess.PIPE))
        except OSError as e:
            print(f"harness launch: cannot start {command[0]}: {e.strerror}", file=sys.stderr, flush=True)
            _signal(procs, signal.SIGTERM)
            return 127
    if watch_stdin:
        threading.Thread(target=_watch_stdin, args=(procs,), daemon=True).start()
    status: Optional[int] = None
    while any(p.poll() is None for p in procs):
        if stopping and time.monotonic() > stopping[0] + STOP_SECONDS:
            _signal(procs, signal.SIGKILL)
        if not elastic and status is None:
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            status = failed[0] if failed else None
            if status is not None:  # one machine failed: the others' ranks would wait for its for ever
                stopping.append(time.monotonic())
                _signal(procs, signal.SIGTERM)
        time.sleep(0.2)
    codes = [_status(p.returncode) for p in procs]
    if elastic:
        return codes[0]
    if status is not None:
        return _status(status)
    return next((c for c in codes if c), 0)


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: 128+N, as a shell says it


def _watch_stdin(procs: List[subprocess.Popen]) -> None:
    try:
        while os.read(sys.stdin.fileno(), 4096):
            pass
    except (OSError, ValueError):
        pass
    _signal(procs, signal.SIGTERM)
    time.sleep(STOP_SECONDS)
    _signal(procs, signal.SIGKILL)


def main(argv: List[str]) -> int:
    elastic = "--elastic" in argv
    watch = "--watch-stdin" in argv
    rest = [a for a in argv if a not in ("--elastic", "--watch-stdin")]
    if len(rest) != 1:
        print("usage: python -m harness.launch.agents [--elastic] [--watch-stdin] JSON", file=sys.stderr)
        return 2
    try:
        commands = json.loads(rest[0])
    except ValueError as e:
        print(f"harness.launch.agents: not JSON: {e}", file=sys.stderr)
        return 2
    return run(commands, elastic, watch)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
