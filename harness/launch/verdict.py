"""The verdict of `harness launch` on a failed attempt, in one line: which rank failed and how, or which
machine was lost."""

from __future__ import annotations

from typing import Any, Dict, List

from harness.output import jobstate


def root_cause(
    state: str, failures: List[Dict[str, Any]], rc: int, exits: Dict[int, str], killed_here: bool = False
) -> str:
    """What ended the job: a rank's own error first; else a rank that died without a word (killed: its
    pid is registered but it left no error), before the errors the others got from its absence. Ranks
    that harness launch killed itself (`killed_here`, after a lost machine or another rank's failure) are not
    among the silent, but for those whose own end the launcher had reported by then (a crash)."""
    own = [f for f in failures if not f.get("consequential")]
    if own:
        return f"[rank {own[0]['rank']}] {own[0]['message']}" if own[0].get("rank") else own[0]["message"]
    reported = {f.get("rank") for f in failures}
    registered = jobstate.ranks(state)
    if killed_here:
        reported |= set(jobstate.ranks_here(state)) - set(exits)
    silent = sorted(r for r in registered if r not in reported)
    if not silent:
        return (
            failures[0]["message"]
            if failures
            else f"the launcher exited with status {rc} before any rank started"
        )
    after = f"; then: {failures[0]['message'].split('. ')[0]}" if failures else ""
    host_of = {r: registered[r].get("host", "?") for r in registered}
    lost = [
        h for h in dict.fromkeys(host_of.values()) if all(r in silent for r in host_of if host_of[r] == h)
    ]
    if len(set(host_of.values())) > 1 and lost:  # every rank of a machine went at once: the machine is gone
        gone = [r for r in silent if host_of[r] in lost]
        return (
            f"lost {', '.join(lost)}: {_said(gone, registered, where=False)} died without an error of their "
            f"own (the machine, its network or its ssh connection went away?){after}"
        )
    known = [f"{_said([r], registered)} {exits[r]}" for r in silent if r in exits]
    if known:
        return f"{', '.join(known)}, without an error of its own{after}"
    return (
        f"{_said(silent, registered)} died without an error of its own (killed by a signal: SIGKILL, the "
        f"out-of-memory killer, a crash?){after}"
    )


def _said(which: List[int], registered: Dict[int, Dict[str, Any]], where: bool = True) -> str:
    """`rank 2 (pid 4242), rank 3 (pid 4243) on hostb`: the machine is named where there are several."""
    said = ", ".join(f"rank {r} (pid {registered[r].get('pid')})" for r in which)
    on = {registered[r].get("host") for r in which}
    if where and len(on) == 1 and len({v.get("host") for v in registered.values()}) > 1:
        said += f" on {on.pop()}"
    return said
