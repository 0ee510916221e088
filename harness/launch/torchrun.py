"""`harness launch --backend torch`: the torchrun command lines (torch.distributed.run) for one machine, for
several (one torchrun agent per machine, started here or by ssh) and for elastic membership (torchrun's
elastic agent with c10d rendezvous). Imports no torch."""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from harness.errors import HarnessError
from harness.launch import hosts
from harness.output.lock import HOLDER_ENV

OUTPUT_ENV = "HARNESS_OUTPUT_DIR"
BACKEND_ENV = "HARNESS_BACKEND"
# What the ranks on another machine need from this one's environment (ssh starts a bare one).
PASSED_ENV = (
    "PATH",
    "PYTHONPATH",
    OUTPUT_ENV,
    HOLDER_ENV,
    "OMP_NUM_THREADS",
    "HARNESS_TRACEBACK",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
)
# horovodrun's own ssh options: no password prompt that would hang the job, no host key question.
SSH_OPTIONS = ["-o", "PasswordAuthentication=no", "-o", "StrictHostKeyChecking=no"]
RDZV_PORT = 29400  # torchrun's own default for c10d rendezvous


@dataclass
class Elastic:
    """`--min-np A --max-np B` as torchrun counts it: machines of `per_node` ranks each."""

    min_nodes: int
    max_nodes: int
    note: Optional[str] = None


@dataclass
class TorchPlan:
    """One attempt under torchrun: the command harness launch runs, what it prints for it, and the command
    that adds a machine to an elastic job."""

    command: List[str]
    shown: str
    join: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)


def elastic_nodes(min_np: int, max_np: int, per_node: int) -> Elastic:
    """Map `--min-np/--max-np` (ranks) to torchrun's `--nnodes MIN:MAX` (machines of `per_node` ranks): at
    least min_np ranks, at most max_np; said in one line when they are not multiples of `per_node`."""
    if min_np < 1 or max_np < min_np:
        raise HarnessError(f"harness launch: --min-np {min_np} --max-np {max_np}: need 1 <= min-np <= max-np")
    low, high = -(-min_np // per_node), max_np // per_node
    if high < low:
        raise HarnessError(
            f"harness launch: --min-np {min_np} --max-np {max_np} with {per_node} ranks per machine: no "
            "number of machines fits (torchrun's elastic membership counts whole machines)"
        )
    note = None
    if min_np % per_node or max_np % per_node:
        note = (
            f"torchrun's elastic membership counts machines of {per_node} ranks: --min-np {min_np} --max-np "
            f"{max_np} runs on {low} to {high} machines ({low * per_node} to {high * per_node} ranks)"
        )
    return Elastic(low, high, note)


def uniform_slots(where: hosts.Placement) -> Tuple[List[str], int]:
    """The machines of this attempt and their ranks each (torchrun runs as many on every machine)."""
    assert where.hosts is not None
    listed = hosts.parse_list(where.hosts)
    per_node = {n for _, n in listed}
    if len(per_node) > 1:
        raise HarnessError(
            f"harness launch --backend torch: torchrun runs the same number of ranks on every machine; "
            f"{where.hosts} has {', '.join(str(n) for _, n in listed)}"
        )
    slots = per_node.pop()
    if where.np % slots or where.np > slots * len(listed):
        raise HarnessError(
            f"harness launch --backend torch: -np {where.np} on {where.hosts}: torchrun runs {slots} ranks "
            f"on each machine, -np: a multiple of {slots}, at most {slots * len(listed)} (or leave it out)"
        )
    return [h for h, _ in listed[: where.np // slots]], slots


def is_this_machine(host: str) -> bool:
    """Whether `host` names this machine (then its agent starts here, not by ssh): an address of its own
    can be bound to."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    if address.startswith("127."):
        return True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _torchrun(nproc: int, harness: List[str], script: bool) -> List[str]:
    """`python -m torch.distributed.run ... -m harness ARGS` with this virtualenv's python (a Trainer script
    runs as itself: `--no-python python train.py`)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return [*run, "--no-python", *harness] if script else [*run, "-m", "harness", *harness]


def plan(
    where: hosts.Placement,
    harness: List[str],
    script: bool,
    env: Dict[str, str],
    ssh_port: Optional[int],
    interface: Optional[str],
    elastic: Optional[Tuple[int, int]],
    max_restarts: int,
    job_id: str,
) -> TorchPlan:
    """The command for one attempt. One machine: torchrun --standalone. Several: one torchrun agent per
    machine (`--nnodes K --node-rank i`, the first machine as rendezvous endpoint), under
    `python -m harness.launch.agents`, which starts them (by ssh where not this machine) and ends with them.
    `elastic` (min, max ranks): c10d rendezvous, `--nnodes MIN:MAX`, torchrun's `--max-restarts`."""
    env = dict(env)
    if interface:
        env.update(GLOO_SOCKET_IFNAME=interface, NCCL_SOCKET_IFNAME=interface)
    if not where.hosts and elastic is None:
        command = [*_torchrun(where.np, harness, script)]
        command[3:3] = ["--standalone"]
        return TorchPlan(command, " ".join(command), env=env)
    if where.hosts:
        machines, per_node = uniform_slots(where)
    else:
        machines, per_node = ["localhost"], where.np
    first = machines[0]
    port = free_port() if is_this_machine(first) else RDZV_PORT
    if first == "localhost" or first.startswith("127."):  # the endpoint as a machine that joins later sees it
        first = socket.gethostname() if elastic is not None or len(machines) > 1 else first
    if elastic is not None:
        # torch 2.13: with the rendezvous store shared with the ranks (the default), a machine joining a
        # running job left both agents waiting for each other's keys until the store's 60 s timeout (plain
        # torchrun, two agents on one machine); with a store of its own the join restarted both at world 2.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        nodes = elastic_nodes(elastic[0], elastic[1], per_node)
        if len(machines) > nodes.max_nodes:
            machines = machines[: nodes.max_nodes]
        rdzv = [f"--nnodes={nodes.min_nodes}:{nodes.max_nodes}", "--rdzv-backend=c10d"]
        rdzv += [f"--rdzv-endpoint={first}:{port}", f"--rdzv-id={job_id}", f"--max-restarts={max_restarts}"]
    agents: List[List[str]] = []
    plain: List[List[str]] = []  # the torchrun commands themselves, without ssh around them
    for i, host in enumerate(machines):
        agent = _torchrun(per_node, harness, script)
        if elastic is None:
            agent[3:3] = [f"--nnodes={len(machines)}", f"--node-rank={i}"]
            agent[3:3] = [f"--master-addr={first}", f"--master-port={port}"]
        else:
            # The agent's address as the others reach it (-H's name; torchrun would look its own hostname up,
            # which need not resolve elsewhere), and which agent hosts the rendezvous store: said, not
            # guessed from the hostname (socket.gaierror where it does not resolve).
            own = socket.gethostname() if host == "localhost" or host.startswith("127.") else host
            agent[3:3] = [*rdzv, f"--local-addr={own}", f"--rdzv-conf=is_host={int(i == 0)}"]
        plain.append(agent)
        agents.append(agent if is_this_machine(host) else remote(host, agent, env, ssh_port))
    command = [sys.executable, "-m", "harness.launch.agents"]
    command += ["--elastic"] if elastic is not None else []
    command += [json.dumps(agents)]
    ssh = [h for h in machines if not is_this_machine(h)]
    by_ssh = f" ({', '.join(ssh)} by ssh)" if ssh else ""
    shown = f"{len(machines)} torchrun agent(s) on {', '.join(machines)}{by_ssh}, the first: "
    shown += shlex.join(plain[0])
    join = None
    if elastic is not None:
        base = _torchrun(per_node, harness, script)
        base[3:3] = [*rdzv, "--rdzv-conf=is_host=0"]
        join = shell_line(base, env)
    return TorchPlan(command, shown, join, env)


def shell_line(command: List[str], env: Dict[str, str]) -> str:
    """`cd CWD && env VAR=... COMMAND`: the command as another machine's shell runs it."""
    passed = [f"{k}={env[k]}" for k in (*PASSED_ENV, BACKEND_ENV) if k in env]
    passed += [f"{k}={v}" for k, v in env.items() if k.endswith("_SOCKET_IFNAME")]
    return f"cd {shlex.quote(os.getcwd())} && exec env {shlex.join(passed)} {shlex.join(command)}"


def remote(host: str, agent: List[str], env: Dict[str, str], ssh_port: Optional[int]) -> List[str]:
    """ssh to `host` running the agent under `harness.launch.agents --watch-stdin`, which ends the agent
    (SIGTERM: torchrun passes it to its ranks) when the ssh connection closes: ssh alone would leave it."""
    watched = [sys.executable, "-m", "harness.launch.agents", "--watch-stdin", json.dumps([agent])]
    port = ["-p", str(ssh_port)] if ssh_port else []
    return ["ssh", *SSH_OPTIONS, *port, host, shell_line(watched, env)]


def check_options(
    backend: str,
    launcher: Optional[str],
    np: Optional[int],
    min_np: Optional[int],
    max_np: Optional[int],
    restarted_with: Optional[str] = None,
) -> Optional[Tuple[int, int]]:
    """The backend's options, checked together: returns (min, max) ranks for an elastic job, else None.
    `restarted_with`: --fresh or --resume, if given (the ranks would do it again at every restart)."""
    if backend not in ("horovod", "torch"):  # from $HARNESS_BACKEND (argparse checks the flag's value)
        raise HarnessError(f"harness launch: {BACKEND_ENV}={backend!r}: expected 'horovod' or 'torch'")
    if backend == "torch" and launcher:
        raise HarnessError(
            f"harness launch: --launcher {launcher} is horovodrun's; --backend torch runs torchrun"
        )
    if min_np is None and max_np is None:
        return None
    if backend != "torch":
        raise HarnessError(
            "harness launch: --min-np/--max-np (elastic membership) need --backend torch (torchrun's elastic "
            "agent); under Horovod a lost machine means a restart from the newest checkpoint"
        )
    if min_np is None or max_np is None:
        raise HarnessError("harness launch: give both --min-np and --max-np")
    if restarted_with:
        raise HarnessError(
            f"harness launch: {restarted_with} with --min-np/--max-np: torchrun restarts the ranks with the "
            "same arguments whenever a machine joins or leaves, which would start over each time; use a new "
            "--output, or resume an --output as it is (its newest checkpoint)"
        )
    if np is not None:
        raise HarnessError(
            "harness launch: -np with --min-np/--max-np: the machines of -H (each with its slots) start the "
            "job, and more may join up to --max-np"
        )
    return min_np, max_np


def check_horovod(launcher: Optional[str]) -> None:
    """The Horovod backend under a launcher needs horovodrun (but for mpirun) and `import horovod.torch`:
    one line naming the torch backend when they are missing."""
    import importlib.util
    import shutil

    runner = "mpirun" if launcher == "mpirun" else "horovodrun"
    found = shutil.which(runner) or os.path.exists(os.path.join(os.path.dirname(sys.executable), runner))
    try:
        importable = importlib.util.find_spec("horovod.torch") is not None
    except (ImportError, ValueError):  # horovod/__init__.py itself failed
        importable = False
    if not found or not importable:
        missing = f"{runner} is not installed" if not found else "Horovod cannot be imported (import horovod)"
        raise HarnessError(
            f"harness launch: {missing}; run with the torch backend instead: harness launch --backend torch "
            "(or set up without Horovod: HARNESS_WITHOUT_HOROVOD=1 make setup)"
        )


def threads_for_ranks(env: Dict[str, str], per_machine: int) -> Dict[str, str]:
    """OMP_NUM_THREADS for torchrun's ranks: torchrun sets 1 for each (nproc > 1), which the ranks would take
    for the user's choice; the harness's own split (cores / ranks on the machine) instead, unless the
    user's environment has it. (Imports torch, for harness.distributed's count of usable cores.)"""
    if "OMP_NUM_THREADS" in env:
        return env
    from harness.distributed import available_cores

    return dict(env, OMP_NUM_THREADS=str(max(1, available_cores() // max(1, per_machine))))


def ranks_per_machine(where: hosts.Placement) -> int:
    if not where.hosts:
        return where.np
    return hosts.parse_list(where.hosts)[0][1]
