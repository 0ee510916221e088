"""What the launchers print, read line by line by `harness launch`: how each rank ended, a lost machine,
and the launchers' own failure reports, left out (the harness says what failed in one line of its own)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from harness.output import jobstate

# How launchers report a rank's end: horovodrun --gloo "Process 1 exit with status code 137", Open MPI
# "... process rank 1 with PID 4242 on node n1 exited on signal 9 (Killed)".
_EXIT_PATTERNS = (
    re.compile(r"Process (?P<rank>\d+) exit with status code (?P<status>-?\d+)"),
    re.compile(r"process rank (?P<rank>\d+) with PID \d+ on node \S+ exited on signal (?P<signal>\d+)"),
)

# torchrun's "Root Cause" box: "  rank      : 1 (local_rank: 1)", then "  exitcode  : -9 (pid: 4242)".
_TORCH_RANK = re.compile(r"^\s*rank\s*:\s*(?P<rank>\d+) \(local_rank: \d+\)")
_TORCH_EXIT = re.compile(r"^\s*exitcode\s*:\s*(?P<status>-?\d+) \(pid: \d+\)")

# Open MPI's report of a rank's fatal signal, as it happens ("[1,1]<stderr>:[vm:01001] Signal: Segmentation
# fault (11)"): mpirun itself took 60 s more to end the job (odls_base_sigkill_timeout, twice).
_CRASH = re.compile(r"\[\d+,(?P<rank>\d+)\]<stderr>:\[[^\]]*\] Signal: [^(]*\((?P<signal>\d+)\)")


# How launchers report a lost machine: ssh (horovodrun, mpirun) "Connection to 10.0.0.2 closed by remote
# host.", Open MPI "ORTE has lost communication with a remote daemon".
_LOST_PATTERNS = (
    re.compile(r"Connection to (?P<host>\S+) closed by remote host"),
    re.compile(r"lost communication with a remote daemon"),
)
# Once a machine is lost or a rank has failed, the launcher gets this long to end the job itself. Open MPI's
# teardown waits odls_base_sigkill_timeout twice (SIGCONT, wait, SIGTERM, wait, SIGKILL: a minute at the
# 30 s that harness launch sets for checkpoints) while the ranks left are blocked in collectives that never
# end, and after a machine that vanished without closing its connections mpirun waits for it for ever.
ENDING_GRACE_SECONDS = 10.0
# A rank that has announced its failure (its last word, jobstate.announce_failure) is exiting: the launcher
# gets this long to end the job itself (plain horovodrun and mpirun take about 1 s), then harness launch ends
# it. Open MPI would otherwise give the others odls_base_sigkill_timeout (30 s, for checkpoints) twice.
ANNOUNCED_GRACE_SECONDS = 1.0


class Output:
    """Passes the launcher's output through, line by line, noting how each rank ended and leaving out the
    launchers' own reports of a failure (horovodrun's traceback, Open MPI's boxes, "Process 1 exit with
    status code 1"): the harness says what failed in one line of its own."""

    def __init__(self, proc: subprocess.Popen):
        self.exits: Dict[int, str] = {}
        self.failed = False  # a rank has printed its error: what follows from it is not news
        self.lost: Optional[str] = None  # the machine the launcher reported lost
        self.announced: Dict[int, Dict[str, Any]] = {}  # failure records the ranks printed, by rank
        self.unreachable: Dict[str, str] = {}  # host: why (horovodrun's ssh check before any rank starts)
        self.announced_at: Optional[float] = None  # when the first one, or a crash report, came (monotonic)
        self.threads = [
            threading.Thread(target=self._pump, args=(src, dst), daemon=True)
            for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
        ]
        for t in self.threads:
            t.start()

    def _pump(self, src: Any, dst: Any) -> None:
        quiet = _LauncherNoise()
        ssh_host: Optional[str] = None  # in horovodrun's report of a host that ssh cannot reach
        torch_rank: Optional[int] = None  # the rank of torchrun's box entry being read
        for raw in iter(src.readline, b""):
            line = raw.decode(errors="replace")
            record = jobstate.parse_marker(line)
            if record is not None:  # for harness launch, not the user: left out
                self.announced.setdefault(record["rank"], record)
                self.announced_at = self.announced_at or time.monotonic()
                continue
            m = _SSH_FAILED.match(line)
            if m or ssh_host is not None:  # "ssh not successful for host X:", ssh's words, a blank line
                ssh_host = m.group("host") if m else ssh_host if line.strip() else None
                if not m and ssh_host is not None:
                    self.unreachable.setdefault(ssh_host, line.strip())
                continue
            m = _SSH_ERROR.match(line)
            if m:  # said in harness launch's own line ("cannot reach host ...")
                self.unreachable.setdefault(m.group("host") or m.group("name"), line.strip())
                continue
            for pattern in _EXIT_PATTERNS:
                m = pattern.search(line)
                if m:
                    self.exits.setdefault(int(m.group("rank")), _how(m.groupdict()))
            m = _TORCH_RANK.match(line)
            torch_rank = int(m.group("rank")) if m else torch_rank
            m = _TORCH_EXIT.match(line)
            if m and torch_rank is not None and m.group("status") != "0":
                self.exits.setdefault(torch_rank, _how(m.groupdict()))
            m = _CRASH.search(line)
            if m:  # the rank is dying (Open MPI's report of its fatal signal): its last word, too
                self.exits.setdefault(int(m.group("rank")), _how(m.groupdict()))
                self.announced_at = self.announced_at or time.monotonic()
            self.failed = self.failed or "harness: error:" in line
            for pattern in _LOST_PATTERNS:
                m = pattern.search(line)
                if m and self.lost is None:
                    self.lost = m.groupdict().get("host") or "a machine"
            for keep in quiet.filter(line, self.failed):
                dst.buffer.write(keep.encode())
            dst.flush()
        for keep in quiet.flush():
            dst.buffer.write(keep.encode())
        dst.flush()

    def join(self) -> None:
        deadline = time.monotonic() + 5  # an orphaned process may still hold the pipe: do not wait for it
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))


_DASHES = re.compile(r"^-{20,}\s*$")
_BOX_NOISE = ("terminated normally, but", "mpirun detected that one or more", "mpirun noticed that process")
_LINE_NOISE = (
    re.compile(r"^Process \d+ exit with status code -?\d+\.?\s*$"),
    re.compile(r"^Terminating remaining workers after failure of Process \d+\.?\s*$"),
    re.compile(r"<stderr>:Terminated\s*$"),
)
_GLOO_FAILURE = "RuntimeError: Horovod detected that one or more processes exited with non-zero status"
# torchrun's traceback ends in ChildFailedError and its box (between two lines of "="), or, when it was
# signalled itself, in SignalException; its log lines on a failure say what harness launch says in its own.
_TORCH_FAILURE = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
_TORCH_SIGNALLED = "torch.distributed.elastic.multiprocessing.api.SignalException"
_EQUALS = re.compile(r"^={20,}\s*$")
_TORCH_LOG = re.compile(
    r"^[WEI]\d{4} [\d:.]+ \d+ \S*torch/distributed/elastic/\S+\] (Sending process \d+ closing signal|"
    r"failed \(exitcode: |Received Signals\.SIG\w+ death signal|Closing process \d+ via signal)"
)
# horovodrun's check that it can ssh to every host: "ssh not successful for host X:", ssh's message, a blank
# line (stdout), then a traceback ending in _SSH_TRACEBACK_END (stderr). harness launch says it in one line.
_SSH_FAILED = re.compile(r"^ssh not successful for host (?P<host>\S+?):\s*$")
_SSH_TRACEBACK_END = "RuntimeError: could not connect to some hosts via ssh"
# ssh's own words when harness launch --backend torch starts an agent on a machine it cannot reach.
_SSH_ERROR = re.compile(
    r"^ssh: (?:connect to host (?P<host>\S+) port \d+|Could not resolve hostname (?P<name>[^:\s]+)):"
)


class _LauncherNoise:
    """Filters one stream of launcher output; multi-line reports are held until they can be judged."""

    def __init__(self) -> None:
        self.held: List[str] = []
        # "box" (Open MPI), "traceback" (horovodrun, torchrun), "tail" (after horovodrun's traceback),
        # "torchbox"/"torchbox2" (torchrun's box, before/after its first line of "=")
        self.mode = ""

    def filter(self, line: str, failed: bool) -> List[str]:
        if self.mode == "box":
            self.held.append(line)
            if not _DASHES.match(line):
                return []
            box, self.held, self.mode = self.held, [], ""
            return [] if any(n in "".join(box) for n in _BOX_NOISE) else box
        if self.mode in ("torchbox", "torchbox2"):  # torchrun's box: ends at its second line of "="
            if _EQUALS.match(line):
                self.mode = "torchbox2" if self.mode == "torchbox" else ""
            return []
        if self.mode == "traceback":
            self.held.append(line)
            if line.startswith((" ", "Traceback")):
                return []
            held, self.held, self.mode = self.held, [], ""
            if line.startswith(_GLOO_FAILURE):
                self.mode = "tail"  # then "Process name: 1", "Exit code: 1", a blank line
                return []
            if line.startswith(_TORCH_FAILURE):
                self.mode = "torchbox"
                return []
            if line.startswith(_TORCH_SIGNALLED):
                return []
            if line.startswith(_SSH_TRACEBACK_END):
                return []
            return held
        if self.mode == "tail":
            if line.startswith(("Process name:", "Exit code:")) or not line.strip():
                return []
            self.mode = ""
        if _DASHES.match(line):
            self.mode, self.held = "box", [line]
            return []
        if line.startswith("Traceback (most recent call last):"):  # untagged: the launcher's own
            self.mode, self.held = "traceback", [line]
            return []
        if any(p.search(line) for p in _LINE_NOISE) or _TORCH_LOG.match(line):
            return []
        if failed and "Horovod background loop uncaught exception" in line:
            return []  # a surviving rank's view of the failed one
        return [line]

    def flush(self) -> List[str]:
        held, self.held, self.mode = self.held, [], ""
        return held


def _how(found: Dict[str, Optional[str]]) -> str:
    signal_text, status_text = found.get("signal"), found.get("status")
    number = int(signal_text) if signal_text else None
    if number is None and status_text:
        status = int(status_text)
        number = -status if status < 0 else status - 128 if status > 128 else None
    if number is None:
        return f"exited with status {status_text}"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"was killed by {name}"
