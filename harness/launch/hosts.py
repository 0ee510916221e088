"""Where `harness launch` runs its ranks: `-H`, a hostfile, or a host discovery script asked before every
attempt (as Horovod's elastic mode does), so that a restart after a lost machine runs on those that remain."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import List, Optional, Tuple

from harness.errors import HarnessError

_LINE = re.compile(r"^(?P<host>[^\s:#=]+)(?::(?P<colon>\d+)|\s+slots\s*=\s*(?P<slots>\d+))?\s*$")


def parse(text: str, where: str) -> List[Tuple[str, int]]:
    """Host lines as Horovod and Open MPI write them: `host:slots`, `host slots=N` or `host` (one slot);
    blank lines and # comments are skipped."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise HarnessError(
                f"{where}, line {number}: {raw.strip()!r} is not 'host:slots' or 'host slots=N'"
            )
        slots = int(m.group("colon") or m.group("slots") or 1)
        if slots < 1:
            raise HarnessError(f"{where}, line {number}: {raw.strip()!r} has no slots")
        hosts.append((m.group("host"), slots))
    return hosts


def parse_list(spec: str) -> List[Tuple[str, int]]:
    """`-H a:2,b:2`."""
    return parse("\n".join(spec.split(",")), "-H")


def spec(hosts: List[Tuple[str, int]]) -> str:
    return ",".join(f"{h}:{n}" for h, n in hosts)


def discover(script: str, timeout: float = 60) -> List[Tuple[str, int]]:
    """Run the discovery script; its stdout lists the live hosts. A failing script is an error."""
    try:
        done = subprocess.run([script], capture_output=True, text=True, timeout=timeout)
    except OSError as e:
        raise HarnessError(f"--host-discovery-script {script}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise HarnessError(
            f"--host-discovery-script {script} did not finish within {timeout:.0f} s"
        ) from None
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [""])[-1]
        raise HarnessError(f"--host-discovery-script {script} exited with status {done.returncode}: {said}")
    return parse(done.stdout, f"output of --host-discovery-script {script}")


@dataclass
class Placement:
    """Where one attempt runs: np ranks on hosts (None: this machine)."""

    np: int
    hosts: Optional[str]
    note: Optional[str] = None  # said before the attempt (discovered hosts, fewer ranks than asked)


class HostSource:
    """`-H`, `--hostfile` or `--host-discovery-script`, and the `-np` asked for (None: every slot)."""

    def __init__(
        self, np: Optional[int], hosts: Optional[str], hostfile: Optional[str], script: Optional[str]
    ):
        if sum(x is not None for x in (hosts, hostfile, script)) > 1:
            raise HarnessError("harness launch: give one of -H, --hostfile and --host-discovery-script")
        if np is not None and np < 1:
            raise HarnessError(f"harness launch: -np {np}: at least 1")
        self.np, self.script = np, script
        self.fixed: Optional[List[Tuple[str, int]]] = None
        if hosts is not None:
            self.fixed = parse_list(hosts)
        elif hostfile is not None:
            try:
                with open(hostfile) as f:
                    self.fixed = parse(f.read(), f"--hostfile {hostfile}")
            except OSError as e:
                raise HarnessError(f"--hostfile {hostfile}: {e.strerror}") from None
        if self.fixed is not None and not self.fixed:
            raise HarnessError("harness launch: the host list is empty")

    def placement(self) -> Placement:
        """This attempt's ranks and hosts (the discovery script is asked again every time)."""
        if self.script is None:
            if self.fixed is None:
                return Placement(self.np or 1, None)
            return Placement(self.np or sum(n for _, n in self.fixed), spec(self.fixed))
        live = discover(self.script)
        slots = sum(n for _, n in live)
        if not slots:
            raise HarnessError(f"--host-discovery-script {self.script} lists no live host")
        np = min(self.np or slots, slots)
        note = f"hosts from {self.script}: {spec(live)}"
        if self.np and np < self.np:
            note += f" ({slots} slots: {np} ranks instead of -np {self.np})"
        return Placement(np, spec(live), note)


def launcher_options(
    launcher: str, where: Placement, ssh_port: Optional[int], interface: Optional[str]
) -> List[str]:
    """What reaching other machines takes, in each launcher's words. One host needs no interface (and
    horovodrun refuses one there: "No interface is found for address 127.0.0.1")."""
    out: List[str] = []
    if not where.hosts or len(parse_list(where.hosts)) < 2:
        interface = None
    if launcher == "mpirun":
        if ssh_port:
            out += ["-mca", "plm_rsh_args", f"-p {ssh_port}"]
        if interface:
            out += ["-mca", "btl_tcp_if_include", interface, "-mca", "oob_tcp_if_include", interface]
            out += ["-x", f"NCCL_SOCKET_IFNAME={interface}", "-x", f"HOROVOD_GLOO_IFACE={interface}"]
        return out
    if ssh_port:
        out += ["-p", str(ssh_port)]
    if interface:
        out += ["--network-interface", interface]
    return out
