"""`harness launch`: run the job under a launcher, restart it from the newest checkpoint after a failure, and
pass SIGTERM / Ctrl-C on to the ranks (which checkpoint at a batch they agree on)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from harness.arguments import parse_args
from harness.config import yaml12
from harness.errors import HarnessError
from harness.launch import hosts, torchrun
from harness.launch.output import ANNOUNCED_GRACE_SECONDS, ENDING_GRACE_SECONDS, Output
from harness.launch.verdict import root_cause as _root_cause
from harness.output import jobstate
from harness.output.lock import HOLDER_ENV, OutputLock

OUTPUT_ENV = "HARNESS_OUTPUT_DIR"  # where a Trainer script's ranks write (harness/trainer.py)
# How long a launcher may outlive every rank before it is ended (it exits within about a second when well).
LINGER_SECONDS = 10.0


def _launch_command(
    launcher: Optional[str],
    where: hosts.Placement,
    reach: List[str],
    harness_args: List[str],
    script: Optional[List[str]] = None,
) -> List[str]:
    """The launcher's command line; each rank runs the harness with `harness_args`, or `script` (a
    Determined Trainer script: ``python train.py ...``)."""
    harness = script or [sys.executable, "-m", "harness", *harness_args]
    if launcher is None and where.np == 1 and not where.hosts:
        return harness  # one process on this machine needs no launcher (3 s less start-up)
    launcher = launcher or "horovodrun"
    on = where.hosts or f"localhost:{where.np}"
    if launcher == "mpirun":
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        passed = [x for v in ("PATH", "PYTHONPATH", OUTPUT_ENV) if v in os.environ for x in ("-x", v)]
        passed += ["-x", HOLDER_ENV]  # set for the ranks in harness launch's environment
        return ["mpirun", *root, "-np", str(where.np), "-H", on, *reach, *passed, *harness]
    flag = {"gloo": ["--gloo"], "mpi": ["--mpi"], "horovodrun": []}[launcher]
    horovodrun = shutil.which("horovodrun") or os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return [horovodrun, *flag, "-np", str(where.np), "-H", on, *reach, *harness]


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
    """`--config <(...)` (a pipe) can be read once, here: the ranks get a copy in OUTPUT. Read with the
    ranks' own limit (`yaml12.MAX_BYTES`), so that `--config /dev/zero` is refused, not read for ever.
    (A regular file, a directory or a missing path is left to the config loader and its messages.)"""
    if not config or os.path.isfile(config) or os.path.isdir(config) or not os.path.exists(config):
        return harness_args
    try:
        with open(config, "rb") as f:
            data = f.read(yaml12.MAX_BYTES + 1)
    except OSError as e:
        raise HarnessError(f"{config}: cannot read the config: {e.strerror or e}") from None
    if len(data) > yaml12.MAX_BYTES:
        raise HarnessError(yaml12._too_big(config, None))
    os.makedirs(output, exist_ok=True)
    copy = os.path.join(output, "launch-config.yaml")
    with open(copy, "wb") as f:
        f.write(data)
    return _without(harness_args, "--config", True) + ["--config", copy]


class _Job:
    """One attempt at a time under its launcher, and the signals that stop it."""

    def __init__(self, state: str, env: Dict[str, str]):
        self.state, self.env = state, env
        self.proc: Optional[subprocess.Popen] = None
        self.terminating: List[int] = []
        self.ended_here = False  # this attempt's ranks on this machine were killed here (_end_if_failing)
        self.exits_at_kill: Dict[int, str] = {}  # how ranks had ended, as the launcher said, by then
        self.failing_since: Optional[float] = None  # when this attempt was first seen to fail
        self.announced: Dict[int, Dict[str, Any]] = {}  # the failure records the ranks printed
        self.unreachable: Dict[str, str] = {}  # hosts the launcher could not reach: why
        self.expected: Optional[int] = None  # this attempt's number of ranks
        self.lingered = False  # the launcher outlived every rank and was ended here (_end_if_lingering)
        self.ranks_gone_since: Optional[float] = None
        # torchrun's elastic agent: a lost machine or a failed rank is its to handle (a restart in the job)
        self.elastic = False

    def on_term(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.terminating and self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a second Ctrl-C: abort now
            jobstate.signal_ranks(self.state, signal.SIGKILL)
            print("harness launch: aborted (second Ctrl-C)", flush=True)
            os._exit(130)
        self.terminating.append(signum)
        # The ranks checkpoint at a batch they agree on (SIGTERM to each: the launcher would kill them).
        # Ranks on other machines stop with them: stopping is voted on by every rank.
        if not jobstate.signal_ranks(self.state, signal.SIGTERM) and self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # no rank running here: stop the launcher

    def run(self, command: List[str], shown: Optional[str] = None) -> Tuple[int, Dict[int, str]]:
        """Run the launcher to its end; returns its status and how each rank ended, as it said."""
        print(f"harness launch: {shown or ' '.join(command)}", flush=True)
        proc = self.proc = subprocess.Popen(
            command, env=self.env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        output = Output(proc)
        deadline = None
        self.ended_here, self.failing_since, self.exits_at_kill = False, None, {}
        self.lingered, self.ranks_gone_since = False, None
        while True:
            try:
                rc = proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                if self.terminating and deadline is None:
                    deadline = time.monotonic() + 60
                if deadline is not None and time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    jobstate.signal_ranks(self.state, signal.SIGKILL)  # torchrun's: sessions of their own
                if not self.terminating and not self.ended_here and not self.elastic:
                    self._end_if_failing(proc, output)
                    self._end_if_lingering(proc, command[0])
        output.join()
        self.announced, self.unreachable = output.announced, output.unreachable
        return rc, output.exits

    def _end_if_lingering(self, proc: subprocess.Popen, launcher: str) -> None:
        """Every rank (all on this machine) has exited and the launcher has not, LINGER_SECONDS later: seen
        with horovodrun --gloo, which waits for the end of its ranks' output, held open by a process a
        rank started (a background subprocess of the model definition). End it, and those processes."""
        registered, here = jobstate.ranks(self.state), jobstate.ranks_here(self.state)
        if self.expected is None or len(registered) != self.expected or len(here) != len(registered):
            return  # ranks not started yet, or on other machines (their pids cannot be seen from here)
        if any(jobstate.running(int(r["pid"])) for r in here.values()):
            self.ranks_gone_since = None
            return
        now = time.monotonic()
        self.ranks_gone_since = self.ranks_gone_since or now
        if now < self.ranks_gone_since + LINGER_SECONDS:
            return
        print(
            f"harness launch: every rank exited {LINGER_SECONDS:.0f} s ago, but {os.path.basename(launcher)} "
            f"(pid {proc.pid}) still runs: a process the job started holds its output open; ending them",
            flush=True,
        )
        self.lingered = True
        groups = {int(r["pgid"]) for r in here.values() if r.get("pgid")} - {os.getpgrp()}
        for group in [*groups, proc.pid]:  # the ranks' process groups hold what they started
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                pass

    def _end_if_failing(self, proc: subprocess.Popen, output: Output) -> None:
        """A machine is lost or a rank has failed, and the launcher has not ended the job within
        ENDING_GRACE_SECONDS: the ranks left wait for the lost ones in collectives that never end, and
        nothing can be saved (a checkpoint needs every rank). End it here. (Timed by this machine's clock
        from when it was seen here: another machine's clock may differ.)"""
        failed = jobstate.failures(self.state, output.announced)
        if self.failing_since is None and (output.lost or failed):
            self.failing_since = time.monotonic()
        now, said = time.monotonic(), output.announced_at
        if said is not None and now >= said + ANNOUNCED_GRACE_SECONDS and not output.lost:
            # A rank said its error and is exiting: nothing is gained by waiting for the launcher.
            self.ended_here, self.exits_at_kill = True, dict(output.exits)
            jobstate.signal_ranks(self.state, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            return
        if self.failing_since is None or now < self.failing_since + ENDING_GRACE_SECONDS:
            return
        if output.lost:
            why = f"{output.lost} is gone"
        else:
            rank = failed[0]["rank"]
            why = f"the launcher did not end the job {ENDING_GRACE_SECONDS:.0f} s after rank {rank} failed"
        print(f"harness launch: {why}; ending the job", flush=True)
        self.ended_here, self.exits_at_kill = True, dict(output.exits)
        jobstate.signal_ranks(self.state, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)

    def wait(self, seconds: float) -> bool:
        """Sleep before a restart; False if a signal asked to stop meanwhile."""
        why = "(a host is unreachable)" if self.unreachable else "(no rank started: is a host unreachable?)"
        print(f"harness launch: waiting {seconds:.0f} s {why}", flush=True)
        until = time.monotonic() + seconds
        while not self.terminating and time.monotonic() < until:
            time.sleep(0.2)
        return not self.terminating


def _parser(script: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness launch",
        usage="harness launch [-np N] [-H HOSTS | --hostfile F | --host-discovery-script S] [--launcher L | "
        "--backend torch [--min-np A --max-np B]] [--max-restarts N] MODEL_DIR [options]\n       "
        "harness launch [-np N ...] [--output OUT] -- python train.py  (a Determined Trainer script)",
        description="Run the job under a launcher and restart it from the newest checkpoint after a failure "
        "(at most max_restarts times; bad input, exit status 2, is not retried). SIGTERM is passed on to the "
        "ranks, which checkpoint and exit 0.",
    )
    p.add_argument("-np", type=int, help="number of ranks (default: every slot of the hosts, or 1)")
    p.add_argument("-H", dest="hosts", help="hosts, e.g. a:4,b:4 (default localhost:NP)")
    p.add_argument("--hostfile", help="a file of hosts, one per line: 'host:slots' or 'host slots=N'")
    p.add_argument(
        "--host-discovery-script",
        help="a program that prints the live hosts ('host:slots' lines), asked before every attempt: a "
        "restart runs on the hosts that remain (at most -np ranks)",
    )
    p.add_argument("--ssh-port", type=int, help="the other machines' sshd port (default 22)")
    p.add_argument("--network-interface", help="the interface the machines share, e.g. eth0")
    p.add_argument(
        "--launcher",
        choices=["horovodrun", "gloo", "mpi", "mpirun"],
        help="default horovodrun; with -np 1 and no -H, the one process runs without a launcher",
    )
    p.add_argument("--max-restarts", type=int, help="overrides the config's max_restarts")
    p.add_argument(
        "--backend",
        choices=["horovod", "torch"],
        default=os.environ.get(torchrun.BACKEND_ENV, "").strip().lower() or "horovod",
        help="horovod (horovodrun, the default) or torch (torchrun and torch.distributed; default "
        f"${torchrun.BACKEND_ENV} if set)",
    )
    p.add_argument("--min-np", type=int, help="--backend torch: elastic, at least this many ranks")
    p.add_argument("--max-np", type=int, help="--backend torch: elastic, at most this many ranks")
    if script:
        p.add_argument("--output", help=f"the script's output folder (default ${OUTPUT_ENV}, else ./output)")
    return p


def launch(argv: List[str]) -> int:
    if "--" in argv:  # harness launch [options] -- python train.py: a Determined Trainer script
        return _launch_script(argv[: argv.index("--")], argv[argv.index("--") + 1 :])
    args, harness_args = _parser().parse_known_args(argv)

    from harness import config

    if harness_args[:1] == ["harness"] and not os.path.exists("harness"):  # copied from a horovodrun line
        raise HarnessError(
            "harness launch takes the model directory itself: harness launch -np N MODEL_DIR [options] "
            "(drop the word 'harness' after the launch options)"
        )
    source = hosts.HostSource(args.np, args.hosts, args.hostfile, args.host_discovery_script)
    train_args = parse_args(harness_args)
    again = "--fresh" if train_args.fresh else "--resume" if train_args.resume else None
    args.elastic = torchrun.check_options(
        args.backend, args.launcher, args.np, args.min_np, args.max_np, again
    )
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
    try:
        return _attempts(args, harness_args, source, state, lock.holder, max_restarts)
    finally:
        lock.release()


def _launch_script(options: List[str], script: List[str]) -> int:
    """A Trainer script under the launcher, restarted like a harness job: each rank runs `script`, which
    writes to (and after a failure resumes from) $HARNESS_OUTPUT_DIR, set here from --output."""
    if not script:
        raise HarnessError("harness launch [options] -- COMMAND: no command after '--' (e.g. python x.py)")
    args = _parser(script=True).parse_args(options)
    source = hosts.HostSource(args.np, args.hosts, args.hostfile, args.host_discovery_script)
    args.elastic = torchrun.check_options(args.backend, args.launcher, args.np, args.min_np, args.max_np)
    output = os.path.abspath(args.output or os.environ.get(OUTPUT_ENV) or "output")
    os.environ[OUTPUT_ENV] = output  # for the ranks (horovodrun passes the environment; mpirun: -x)
    max_restarts = 5 if args.max_restarts is None else args.max_restarts
    state = jobstate.state_dir(output)
    lock = OutputLock(output)
    took_over = lock.acquire()
    if took_over:
        print(f"harness launch: {took_over}", flush=True)
    try:
        return _attempts(args, [], source, state, lock.holder, max_restarts, script)
    finally:
        lock.release()


def _attempts(
    args: argparse.Namespace,
    harness_args: List[str],
    source: hosts.HostSource,
    state: str,
    holder: str,
    max_restarts: int,
    script: Optional[List[str]] = None,
) -> int:
    """Run the job, and again from its newest checkpoint after each failure, up to max_restarts times."""
    env = dict(os.environ, **{HOLDER_ENV: holder})
    env.setdefault("OMPI_MCA_odls_base_sigkill_timeout", "30")  # time for ranks to checkpoint on SIGTERM
    # Open MPI's ranks busy-poll while they wait (start-up, every collective): on a machine with no core to
    # spare they starve the ranks with work. Yielding made MPI as fast as Gloo there (docs/launching.md).
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if args.backend == "torch":
        env[torchrun.BACKEND_ENV] = "torch"  # the ranks' backend, also for a single process
    elif source.fixed or source.script or (source.np or 1) > 1:
        torchrun.check_horovod(args.launcher)
    if args.elastic:  # torchrun's agent restarts the ranks (after failures, at most max_restarts times)
        max_restarts, agent_restarts = 0, max_restarts
    job = _Job(state, env)
    job.elastic = bool(args.elastic)
    signal.signal(signal.SIGTERM, job.on_term)
    signal.signal(signal.SIGINT, job.on_term)
    restarts, unreachable = 0, 0
    while True:
        shutil.rmtree(state, ignore_errors=True)
        where = source.placement()
        if where.note:
            print(f"harness launch: {where.note}", flush=True)
        job.expected = where.np
        if args.backend == "torch" and (where.np > 1 or where.hosts or args.elastic):
            job.env = torchrun.threads_for_ranks(env, torchrun.ranks_per_machine(where))
            ranks = script or harness_args
            plan = torchrun.plan(
                where, ranks, bool(script), job.env, args.ssh_port, args.network_interface, args.elastic,
                agent_restarts if args.elastic else 0, f"harness-{os.getpid()}",
            )  # fmt: skip
            if plan.join:
                print(f"harness launch: to add a machine, run there: {plan.join}", flush=True)
            job.env = plan.env
            rc, exits = job.run(plan.command, plan.shown)
        else:
            reach = hosts.launcher_options(
                args.launcher or "horovodrun", where, args.ssh_port, args.network_interface
            )
            rc, exits = job.run(_launch_command(args.launcher, where, reach, harness_args, script))
        if job.lingered and not jobstate.failures(state, job.announced):
            rc = 0  # every rank ended without an error of its own; only the launcher did not end
        if job.terminating:
            name = signal.Signals(job.terminating[0]).name
            print(f"harness launch: stopped by {name}; the job exited with status {rc}", flush=True)
            return 130 if job.terminating[0] == signal.SIGINT else rc
        if rc == 0:
            return 0
        failures = jobstate.failures(state, job.announced)
        bad_input = [f for f in failures if f.get("exit_code") == HarnessError.exit_code]
        if bad_input:  # bad input, a full disk: running it again would fail the same way
            print(f"harness launch: not restarting: {bad_input[0]['message']}", flush=True)
            return HarnessError.exit_code
        if job.ended_here:  # what the launcher said after the kill is about the kill
            exits = job.exits_at_kill
        cause = _root_cause(state, failures, rc, exits, killed_here=job.ended_here)
        if job.unreachable and not jobstate.ranks(state):
            cause = "; ".join(f"cannot reach host {h} ({why})" for h, why in job.unreachable.items())
        if restarts >= max_restarts:
            print(f"harness launch: giving up after {restarts} restarts; last failure: {cause}", flush=True)
            own = [f["exit_code"] for f in failures if not f.get("consequential") and f.get("exit_code")]
            return own[0] if own else rc if rc > 0 else 1  # the job's own exit status, not the launcher's
        restarts += 1
        print(f"harness launch: restart {restarts} of {max_restarts} after failure: {cause}", flush=True)
        # No rank started (a host unreachable, rebooting?): give it time, longer each time in a row.
        unreachable = 0 if jobstate.ranks(state) else unreachable + 1
        if unreachable and not job.wait(min(2 ** (unreachable - 1), 30)):
            return 130 if job.terminating[0] == signal.SIGINT else 0
        # Later attempts resume from the newest checkpoint in --output.
        harness_args = _without(_without(harness_args, "--fresh", False), "--resume", True)
