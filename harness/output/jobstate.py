"""Per-run bookkeeping in OUTPUT/.harness, shared by the ranks and `harness launch`: each rank's pid and
machine (so that the supervisor can signal the ranks on its machine directly, and name a rank that died
without a word) and each rank's last failure. With several machines OUTPUT is on storage they all see."""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional

from harness.output.lock import HOLDER_ENV, no_space

MARKER = "harness-failure-record: "  # a rank's failure record on stderr, read by `harness launch`


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
    path = os.path.join(directory, f"rank{rank}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            record = {
                "pid": os.getpid(),
                "pgid": os.getpgrp(),
                "host": host_name(),
                "pid_space": _pid_space(),
            }
            json.dump(record, f)
    except OSError as e:
        raise no_space(e, path) or e from None


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


def record_failure(
    output: Optional[str], message: str, code: int, rank: int, consequential: bool
) -> Dict[str, Any]:
    """Leave the error for a supervising `harness launch` (it does not retry bad input, status 2); the
    record is returned for `announce_failure`, which reaches the supervisor when no file can be written."""
    record = {"rank": rank, "exit_code": code, "message": message, "consequential": consequential}
    record["time"] = time.time()
    if not output:
        return record
    try:
        os.makedirs(state_dir(output), exist_ok=True)
        with open(os.path.join(state_dir(output), f"failure-rank{rank}.json"), "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # a full disk, a read-only OUTPUT: announce_failure still says it
    return record


def announce_failure(record: Dict[str, Any]) -> None:
    """This rank's failure record as one marker line on stderr, for a supervising `harness launch` (which
    reads the launcher's output, leaves the line out and takes it as this rank's last word: the rank is
    exiting). Only under `harness launch` (HOLDER_ENV set): plain launchers would show it."""
    if os.environ.get(HOLDER_ENV):
        try:
            sys.stderr.write(MARKER + json.dumps(record) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def parse_marker(line: str) -> Optional[Dict[str, Any]]:
    """The failure record in a launcher's output line (tagged or not), or None."""
    at = line.find(MARKER)
    if at < 0:
        return None
    try:
        record = json.loads(line[at + len(MARKER) :])
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("rank"), int) else None


def ranks_here(state: str) -> Dict[int, Dict[str, Any]]:
    """The registered ranks whose pids are this machine's (a pid from another machine is another process)."""
    here = _pid_space()
    return {r: v for r, v in ranks(state).items() if v.get("pid_space") == here}


def running(pid: int) -> bool:
    """Whether process `pid` (of this machine) still runs: an exited one that its parent has not yet
    reaped (a zombie) does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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


def failures(state: str, announced: Optional[Dict[int, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """The ranks' failure records: OUTPUT/.harness's files, and those `announced` on the launcher's output
    (all there is when the disk is full)."""
    by_rank = dict(announced or {})
    for path in sorted(glob.glob(os.path.join(state, "failure-rank*.json"))):
        try:
            with open(path) as f:
                record = json.load(f)
            by_rank[record["rank"]] = record
        except (OSError, ValueError, KeyError, TypeError):
            pass
    out = list(by_rank.values())
    # The root cause first: an error of its own before one caused by another rank's death.
    return sorted(out, key=lambda f: (bool(f.get("consequential")), f.get("time", 0)))
