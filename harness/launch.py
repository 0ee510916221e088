"""`harness launch`: run the job under a launcher, restart it from the newest checkpoint after a failure, and
pass SIGTERM / Ctrl-C on to the ranks (which checkpoint at a batch they agree on)."""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from harness import jobstate
from harness.errors import HarnessError
from harness.options import parse_args
from harness.outputlock import HOLDER_ENV, OutputLock


def _launch_command(
    launcher: Optional[str], np_: int, hosts: Optional[str], harness_args: List[str]
) -> List[str]:
    harness = [sys.executable, "-m", "harness", *harness_args]
    if launcher is None and np_ == 1 and not hosts:
        return harness  # one process on this machine needs no launcher (3 s less start-up)
    launcher = launcher or "horovodrun"
    hosts = hosts or f"localhost:{np_}"
    if launcher == "mpirun":
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        passed = [x for v in ("PATH", "PYTHONPATH") if v in os.environ for x in ("-x", v)]
        return ["mpirun", *root, "-np", str(np_), "-H", hosts, *passed, *harness]
    flag = {"gloo": ["--gloo"], "mpi": ["--mpi"], "horovodrun": []}[launcher]
    horovodrun = shutil.which("horovodrun") or os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return [horovodrun, *flag, "-np", str(np_), "-H", hosts, *harness]


# How launchers report a rank's end: horovodrun --gloo "Process 1 exit with status code 137", Open MPI
# "... process rank 1 with PID 4242 on node n1 exited on signal 9 (Killed)".
_EXIT_PATTERNS = (
    re.compile(r"Process (?P<rank>\d+) exit with status code (?P<status>-?\d+)"),
    re.compile(r"process rank (?P<rank>\d+) with PID \d+ on node \S+ exited on signal (?P<signal>\d+)"),
)


class _Output:
    """Passes the launcher's output through, line by line, noting how each rank ended and leaving out the
    launchers' own reports of a failure (horovodrun's traceback, Open MPI's boxes, "Process 1 exit with
    status code 1"): the harness says what failed in one line of its own."""

    def __init__(self, proc: subprocess.Popen):
        self.exits: Dict[int, str] = {}
        self.failed = False  # a rank has printed its error: what follows from it is not news
        self.threads = [
            threading.Thread(target=self._pump, args=(src, dst), daemon=True)
            for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
        ]
        for t in self.threads:
            t.start()

    def _pump(self, src: Any, dst: Any) -> None:
        quiet = _LauncherNoise()
        for raw in iter(src.readline, b""):
            line = raw.decode(errors="replace")
            for pattern in _EXIT_PATTERNS:
                m = pattern.search(line)
                if m:
                    self.exits.setdefault(int(m.group("rank")), _how(m.groupdict()))
            self.failed = self.failed or "harness: error:" in line
            for keep in quiet.filter(line, self.failed):
                dst.buffer.write(keep.encode())
            dst.flush()
        for keep in quiet.flush():
            dst.buffer.write(keep.encode())
        dst.flush()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=5)  # an orphaned process may still hold the pipe: do not wait for it


_DASHES = re.compile(r"^-{20,}\s*$")
_BOX_NOISE = ("terminated normally, but", "mpirun detected that one or more", "mpirun noticed that process")
_LINE_NOISE = (
    re.compile(r"^Process \d+ exit with status code -?\d+\.?\s*$"),
    re.compile(r"^Terminating remaining workers after failure of Process \d+\.?\s*$"),
    re.compile(r"<stderr>:Terminated\s*$"),
)
_GLOO_FAILURE = "RuntimeError: Horovod detected that one or more processes exited with non-zero status"


class _LauncherNoise:
    """Filters one stream of launcher output; multi-line reports are held until they can be judged."""

    def __init__(self) -> None:
        self.held: List[str] = []
        self.mode = ""  # "box" (Open MPI), "traceback" (horovodrun), "tail" (after horovodrun's traceback)

    def filter(self, line: str, failed: bool) -> List[str]:
        if self.mode == "box":
            self.held.append(line)
            if not _DASHES.match(line):
                return []
            box, self.held, self.mode = self.held, [], ""
            return [] if any(n in "".join(box) for n in _BOX_NOISE) else box
        if self.mode == "traceback":
            self.held.append(line)
            if line.startswith((" ", "Traceback")):
                return []
            held, self.held, self.mode = self.held, [], ""
            if line.startswith(_GLOO_FAILURE):
                self.mode = "tail"  # then "Process name: 1", "Exit code: 1", a blank line
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
        if any(p.search(line) for p in _LINE_NOISE):
            return []
        if failed and "Horovod background loop uncaught exception" in line:
            return []  # a surviving rank's view of the failed one
        return [line]

    def flush(self) -> List[str]:
        held, self.held, self.mode = self.held, [], ""
        return held


def _how(found: Dict[str, Optional[str]]) -> str:
    number = int(found["signal"]) if found.get("signal") else None
    if number is None and found.get("status"):
        status = int(found["status"])
        number = -status if status < 0 else status - 128 if status > 128 else None
        if number is None:
            return f"exited with status {status}"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"was killed by {name}"


def _root_cause(state: str, failures: List[Dict[str, Any]], rc: int, exits: Dict[int, str]) -> str:
    """What ended the job: a rank's own error first; else a rank that died without a word (killed: its
    pid is registered but it left no error), before the errors the others got from its absence."""
    own = [f for f in failures if not f.get("consequential")]
    if own:
        return f"[rank {own[0]['rank']}] {own[0]['message']}" if own[0].get("rank") else own[0]["message"]
    reported = {f.get("rank") for f in failures}
    silent = []
    for path in sorted(glob.glob(os.path.join(state, "pids", "rank*"))):
        rank = int(os.path.basename(path)[4:])
        if rank not in reported:
            with open(path) as f:
                silent.append((rank, f"rank {rank} (pid {f.read().strip()})"))
    if silent:
        after = f"; then: {failures[0]['message']}" if failures else ""
        known = [f"{who} {exits[rank]}" for rank, who in silent if rank in exits]
        if known:
            return f"{', '.join(known)}, without an error of its own{after}"
        who = ", ".join(w for _, w in silent)
        return (
            f"{who} died without an error of its own (killed by a signal: SIGKILL, the out-of-memory "
            f"killer, a crash?){after}"
        )
    if failures:
        return failures[0]["message"]
    return f"the launcher exited with status {rc} before any rank started"


def _without(args: List[str], flag: str, takes_value: bool) -> List[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = takes_value
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _config_for_ranks(harness_args: List[str], config: Optional[str], output: str) -> List[str]:
    """`--config <(...)` (a pipe) can be read once, here: the ranks get a copy in OUTPUT."""
    if not config or os.path.isfile(config) or not os.path.exists(config):
        return harness_args
    with open(config, "rb") as f:
        data = f.read()
    os.makedirs(output, exist_ok=True)
    copy = os.path.join(output, "launch-config.yaml")
    with open(copy, "wb") as f:
        f.write(data)
    return _without(harness_args, "--config", True) + ["--config", copy]


def launch(argv: List[str]) -> int:
    p = argparse.ArgumentParser(
        prog="harness launch",
        usage="harness launch [-np N] [-H HOSTS] [--launcher L] [--max-restarts N] MODEL_DIR [options]",
        description="Run the job under a launcher and restart it from the newest checkpoint after a failure "
        "(at most max_restarts times; bad input, exit status 2, is not retried). SIGTERM is passed on to the "
        "ranks, which checkpoint and exit 0.",
    )
    p.add_argument("-np", type=int, default=1, help="number of ranks (default 1)")
    p.add_argument("-H", dest="hosts", help="hosts, e.g. a:4,b:4 (default localhost:NP)")
    p.add_argument(
        "--launcher",
        choices=["horovodrun", "gloo", "mpi", "mpirun"],
        help="default horovodrun; with -np 1 and no -H, the one process runs without a launcher",
    )
    p.add_argument("--max-restarts", type=int, help="overrides the config's max_restarts")
    args, harness_args = p.parse_known_args(argv)

    from harness import config

    if harness_args[:1] == ["harness"] and not os.path.exists("harness"):  # copied from a horovodrun line
        raise HarnessError(
            "harness launch takes the model directory itself: harness launch -np N MODEL_DIR [options] "
            "(drop the word 'harness' after the launch options)"
        )
    train_args = parse_args(harness_args)
    harness_args = _config_for_ranks(harness_args, train_args.config, train_args.output)
    train_args = parse_args(harness_args)
    model_dir = train_args.model_def
    max_restarts = args.max_restarts
    if max_restarts is None:
        max_restarts = config.load_for_model(model_dir, train_args.config).max_restarts
    state = jobstate.state_dir(train_args.output)
    lock = OutputLock(train_args.output)  # held for every attempt; the ranks know it is held for them
    took_over = lock.acquire()
    if took_over:
        print(f"harness launch: {took_over}", flush=True)
    env = dict(os.environ, **{HOLDER_ENV: str(os.getpid())})
    env.setdefault("OMPI_MCA_odls_base_sigkill_timeout", "30")  # time for ranks to checkpoint on SIGTERM

    terminating: List[int] = []

    def on_term(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in terminating and proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)  # a second Ctrl-C: abort now
            jobstate.signal_ranks(state, signal.SIGKILL)
            print("harness launch: aborted (second Ctrl-C)", flush=True)
            os._exit(130)
        terminating.append(signum)
        # The ranks checkpoint at a batch they agree on (SIGTERM to each: the launcher would kill them).
        if not jobstate.signal_ranks(state, signal.SIGTERM) and proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)  # no rank running yet: stop the launcher

    proc: Optional[subprocess.Popen] = None
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    restarts = 0
    while True:
        shutil.rmtree(state, ignore_errors=True)
        command = _launch_command(args.launcher, args.np, args.hosts, harness_args)
        print(f"harness launch: {' '.join(command)}", flush=True)
        proc = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        output = _Output(proc)
        deadline = None
        while True:
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if terminating and deadline is None:
                    deadline = time.monotonic() + 60
                if deadline is not None and time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
        output.join()
        if terminating:
            name = signal.Signals(terminating[0]).name
            print(f"harness launch: stopped by {name}; the job exited with status {rc}", flush=True)
            lock.release()
            return 130 if terminating[0] == signal.SIGINT else rc
        if rc == 0:
            lock.release()
            return 0
        failures = jobstate.failures(state)
        bad_input = [f for f in failures if f.get("exit_code") == HarnessError.exit_code]
        if bad_input:  # bad input, a full disk: running it again would fail the same way
            print(f"harness launch: not restarting: {bad_input[0]['message']}", flush=True)
            lock.release()
            return HarnessError.exit_code
        cause = _root_cause(state, failures, rc, output.exits)
        if restarts >= max_restarts:
            print(f"harness launch: giving up after {restarts} restarts; last failure: {cause}", flush=True)
            lock.release()
            own = [f["exit_code"] for f in failures if not f.get("consequential") and f.get("exit_code")]
            return own[0] if own else rc or 1  # the job's own exit status, not the launcher's
        restarts += 1
        print(f"harness launch: restart {restarts} of {max_restarts} after failure: {cause}", flush=True)
        # Later attempts resume from the newest checkpoint in --output.
        harness_args = _without(_without(harness_args, "--fresh", False), "--resume", True)
