"""Per-run bookkeeping in OUTPUT/.harness, shared by the ranks and `harness launch` on the same machine:
each rank's pid (so that the supervisor can signal the ranks directly) and each rank's last failure."""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Dict, List, Optional


def state_dir(output: str) -> str:
    """OUTPUT/.harness: per-run bookkeeping shared with `harness launch` on the same machine."""
    return os.path.join(output, ".harness")


def register_rank(output: str, rank: int) -> None:
    """Let a supervising `harness launch` find this rank (to pass SIGTERM on to it directly)."""
    directory = os.path.join(state_dir(output), "pids")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}"), "w") as f:
        f.write(str(os.getpid()))


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


def signal_ranks(state: str, sig: int) -> int:
    """Send `sig` to this machine's ranks (they registered their pids); returns how many were signalled."""
    sent = 0
    for path in glob.glob(os.path.join(state, "pids", "rank*")):
        try:
            with open(path) as f:
                os.kill(int(f.read().strip()), sig)
            sent += 1
        except (OSError, ValueError):
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
