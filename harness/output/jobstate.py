"""Per-run bookkeeping in OUTPUT/.harness, shared by the ranks and `harness launch`: each rank's pid and
machine (so that the supervisor can signal the ranks on its machine directly, and name a rank that died
without a word) and each rank's last failure. With several machines OUTPUT is on storage they all see."""

from __future__ import annotations

import glob
import json
import os
import socket
import time
from typing import Any, Dict, List, Optional


def state_dir(output: str) -> str:
    """OUTPUT/.harness: per-run bookkeeping shared with `harness launch` on the same machine."""
    return os.path.join(output, ".harness")


def _pid_space() -> str:
    """Which pids os.kill reaches: this kernel's boot and this pid namespace (another machine, or another
    container on this one, has its own)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def host_name() -> str:
    """This rank's machine as people know it: the launcher's name for it (horovodrun -H) and the hostname."""
    launcher_name, hostname = os.environ.get("HOROVOD_HOSTNAME"), socket.gethostname()
    if launcher_name and launcher_name not in (hostname, "localhost", "127.0.0.1"):
        return f"{hostname} ({launcher_name})"
    return hostname


def register_rank(output: str, rank: int) -> None:
    """Let a supervising `harness launch` find this rank: to pass SIGTERM on to it directly (when it runs on
    the supervisor's machine) and to name it, with its machine, if it dies without a word."""
    directory = os.path.join(state_dir(output), "pids")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}"), "w") as f:
        json.dump({"pid": os.getpid(), "host": host_name(), "pid_space": _pid_space()}, f)


def ranks(state: str) -> Dict[int, Dict[str, Any]]:
    """The registered ranks: {rank: {"pid", "host", "pid_space"}}."""
    out = {}
    for path in glob.glob(os.path.join(state, "pids", "rank*")):
        try:
            with open(path) as f:
                out[int(os.path.basename(path)[4:])] = json.load(f)
        except (OSError, ValueError):
            pass
    return out


def record_failure(output: Optional[str], message: str, code: int, rank: int, consequential: bool) -> None:
    """Leave the error for a supervising `harness launch` (it does not retry bad input, status 2)."""
    if not output:
        return
    try:
        os.makedirs(state_dir(output), exist_ok=True)
        with open(os.path.join(state_dir(output), f"failure-rank{rank}.json"), "w") as f:
            record = {"rank": rank, "exit_code": code, "message": message, "consequential": consequential}
            json.dump({**record, "time": time.time()}, f)
    except OSError:
        pass


def ranks_here(state: str) -> Dict[int, Dict[str, Any]]:
    """The registered ranks whose pids are this machine's (a pid from another machine is another process)."""
    here = _pid_space()
    return {r: v for r, v in ranks(state).items() if v.get("pid_space") == here}


def signal_ranks(state: str, sig: int) -> int:
    """Send `sig` to the ranks on this machine; returns how many were signalled. The others stop with them:
    stopping is voted on by every rank."""
    sent = 0
    for rank in ranks_here(state).values():
        try:
            os.kill(int(rank["pid"]), sig)
            sent += 1
        except (OSError, ValueError, KeyError):
            pass
    return sent


def failures(state: str) -> List[Dict[str, Any]]:
    out = []
    for path in sorted(glob.glob(os.path.join(state, "failure-rank*.json"))):
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            pass
    # The root cause first: an error of its own before one caused by another rank's death.
    return sorted(out, key=lambda f: (bool(f.get("consequential")), f.get("time", 0)))
