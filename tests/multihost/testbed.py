"""Two hosts on one Linux machine, made by the tests themselves (root): network namespaces on a bridge.

Each host has its own network stack (lo and an `eth0` at 10.99.0.N/24 on a bridge that lives in a third,
"switch" namespace, so the machine's own network is not touched), its own hostname (a UTS namespace), its
own processes (a pid namespace: its pids mean nothing on the other host), its own /tmp and /dev/shm (a
mount namespace with the host's private directory bound over /tmp), and its own sshd on a non-default port
that takes only the test's key. The hosts share the rest of the filesystem
(the checkout and its virtualenv, like an image on every machine) and a `shared/` directory (like an NFS
mount). A command runs "on" a host inside that host's namespaces (nsenter into its sshd); the launchers
then reach the other host by ssh, as they would across machines.

Everything made here is removed by `down()`: processes by pid (every pid in a host's network namespace),
the namespaces (which takes the bridge and veth pairs with them) and the directories. What a test process
killed before its clean-up left is found by name (its pid in it) and removed by the next test bed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

SSH_PORT = 2222
ENTRYPOINT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "entrypoint.sh"
)
SUBNET = "10.99.0"
TOOLS = ("ip", "unshare", "nsenter", "mount", "/usr/sbin/sshd", "ssh", "ssh-keygen")


def unavailable() -> Optional[str]:
    """Why the test bed cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network, UTS and mount namespaces)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (make setup installs openssh-server and iproute2)"
    probe = f"hmhprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Host:
    name: str  # the namespace's name
    hostname: str
    address: str
    private: str  # this host's own disk: bound over /tmp inside the host
    unshare: Optional[subprocess.Popen] = None
    sshd: int = 0  # pid (in this machine's pid namespace) of the host's sshd, pid 1 of the host's own
    pod: bool = False  # pid 1 is `entrypoint.sh sshd` (a worker pod of an MPIJob), with sshd its child


@dataclass
class PodEnd:
    """How a pod ended after SIGTERM to its pid 1 (see TestBed.delete_pods)."""

    host: Host
    status: Optional[int]  # pid 1's exit status (None: it needed the SIGKILL)
    seconds: float  # from SIGTERM until pid 1 and every other process of the pod had exited
    killed: List[int]  # pids still there after the grace period, which got the SIGKILL


PREFIX = (
    "hmh"  # namespaces hmh<pid of the test process>{s,0,1}; directories /var/tmp/harness-multihost-<pid>-*
)


def sweep_stale() -> None:
    """Remove what a test process that was killed before its clean-up left (found by name, its pid dead)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for ns in names:
        pid = ns[len(PREFIX) : -1]
        if ns.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            for p in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split():
                try:
                    os.kill(int(p), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for name in os.listdir("/var/tmp"):
        pid = name.split("-")[2] if name.startswith("harness-multihost-") else ""
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join("/var/tmp", name), ignore_errors=True)


class TestBed:
    def __init__(
        self,
        hostnames: Sequence[str] = ("hosta", "hostb"),
        slots: int = 2,
        keep: Sequence[str] = (),
        pods: Sequence[str] = (),
        pod_env: Optional[Dict[str, str]] = None,
        names: bool = False,
    ):
        """`keep`: paths every host must see even if they lie under /tmp (the checkout, the virtualenv).
        `pods`: hostnames whose pid 1 is the checkout's `entrypoint.sh sshd`, as in an MPIJob's worker pod,
        with `pod_env` added to its environment (HARNESS_VENV, HARNESS_STOP_SECONDS, ...).
        `names`: the hosts' names resolve on every host (an /etc/hosts of the bed's own bound over the
        host's), as a cluster's DNS would make them; without it they resolve nowhere."""
        sweep_stale()
        self.keep = list(keep)
        self.pod_env = dict(pod_env or {})
        tag = f"{PREFIX}{os.getpid()}"
        self.base = tempfile.mkdtemp(prefix=f"harness-multihost-{os.getpid()}-", dir="/var/tmp")  # not /tmp
        self.shared = os.path.join(self.base, "shared")
        self.switch = f"{tag}s"
        self.slots = slots
        self.hosts = [
            Host(
                f"{tag}{i}",
                hostname,
                f"{SUBNET}.{i + 1}",
                os.path.join(self.base, f"host{i}"),
                pod=hostname in pods,
            )
            for i, hostname in enumerate(hostnames)
        ]
        self.names = names
        self.namespaces: List[str] = []
        self.made_run_sshd = False
        self.bin = os.path.join(self.base, "bin")

    # -- making it --------------------------------------------------------------------------------------

    def up(self) -> TestBed:
        try:
            self._keys()
            self._network()
            for host in self.hosts:
                self._start(host)
            self._wait_for_sshd()
        except BaseException:
            self.down()
            raise
        return self

    def _keys(self) -> None:
        keys = os.path.join(self.base, "keys")
        for d in (keys, self.shared, self.bin, *(os.path.join(h.private, "tmp") for h in self.hosts)):
            os.makedirs(d)
        os.chmod(keys, 0o700)
        for key in ("host_ed25519", "id_ed25519"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(keys, key)])
        shutil.copy(os.path.join(keys, "id_ed25519.pub"), os.path.join(keys, "authorized_keys"))
        # The client side: our key, no known_hosts written anywhere. Launchers call `ssh` from PATH.
        config = os.path.join(self.base, "ssh_config")
        with open(config, "w") as f:
            f.write(
                f"Host *\n  User root\n  IdentityFile {keys}/id_ed25519\n  IdentitiesOnly yes\n"
                "  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  LogLevel ERROR\n"
                "  BatchMode yes\n  ConnectTimeout 5\n"
            )
        wrapper = os.path.join(self.bin, "ssh")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec /usr/bin/ssh -F {config} "$@"\n')
        os.chmod(wrapper, 0o755)

    def _network(self) -> None:
        for ns in [self.switch] + [h.name for h in self.hosts]:
            _run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for i, host in enumerate(self.hosts):
            port = f"port{i}"
            _run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                  "netns", host.name])  # fmt: skip
            _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0"])
            _run(["ip", "-n", host.name, "link", "set", "eth0", "up"])
            _run(["ip", "-n", host.name, "link", "set", "lo", "up"])

    def _start(self, host: Host) -> None:
        if not os.path.isdir("/run/sshd"):  # sshd's privilege-separation directory
            os.makedirs("/run/sshd", mode=0o755)
            self.made_run_sshd = True
        keys = os.path.join(self.base, "keys")
        config = os.path.join(host.private, "sshd_config")
        host_key = f"{keys}/host_ed25519"
        with open(config, "w") as f:
            f.write(
                f"Port {SSH_PORT}\nListenAddress {host.address}\n"
                + ("" if host.pod else f"HostKey {host_key}\n")  # a pod's entrypoint passes it (-h)
                + f"AuthorizedKeysFile {keys}/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "PidFile none\nPrintMotd no\nMaxStartups 200\nMaxSessions 200\n"
            )
        # The host's own /tmp, through which what the machines share (the checkout, its virtualenv: the
        # "image") still shows when it lies under /tmp (a CI clone may): bound in first, then carried
        # along by the recursive bind.
        private = os.path.join(host.private, "tmp")
        keep = "".join(
            f"mkdir -p {private}/{rel} && mount --bind {path} {private}/{rel} && "
            for path, rel in self._under_tmp()
        )
        serve = f"/usr/sbin/sshd -D -e -f {config}"
        if host.pod:
            env = dict(self.pod_env, HARNESS_SSHD_CONFIG=config, HARNESS_SSHD_HOST_KEY=host_key)
            serve = "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + f" {ENTRYPOINT} sshd"
        if self.names:
            etc_hosts = os.path.join(self.base, "hosts")
            with open(etc_hosts, "w") as f:
                f.write("127.0.0.1 localhost\n" + "".join(f"{h.address} {h.hostname}\n" for h in self.hosts))
            keep += f"mount --bind {etc_hosts} /etc/hosts && "
        inside = (
            f"hostname {host.hostname} && {keep}mount --rbind {private} /tmp && "
            f"mount -t tmpfs -o size=2g tmpfs /dev/shm && exec {serve}"
        )
        log = open(os.path.join(host.private, "sshd.log"), "wb")
        host.unshare = subprocess.Popen(
            ["ip", "netns", "exec", host.name, "unshare", "--uts", "--mount", "--pid", "--fork",
             "--mount-proc", "--propagation", "private", "sh", "-c", inside],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()
        host.sshd = self._child(host.unshare.pid)  # pid 1 of the host's pid namespace

    @staticmethod
    def _child(pid: int, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    children = f.read().split()
            except OSError:
                children = []
            if children:
                return int(children[0])
            time.sleep(0.05)
        raise RuntimeError(f"unshare (pid {pid}) started no host")

    def _under_tmp(self) -> List[tuple]:
        """(path, path relative to /tmp) of what must stay shared although it lies under /tmp."""
        out = []
        for path in dict.fromkeys(os.path.realpath(p) for p in self.keep):
            if path.startswith("/tmp/") and not any(path.startswith(k + "/") for k, _ in out):
                out.append((path, path[len("/tmp/") :]))
        return out

    def _wait_for_sshd(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            for peer in self.hosts:  # every host reaches every host's sshd by key
                while True:
                    probe = self.run(host, ["ssh", "-p", str(SSH_PORT), peer.address, "hostname"], timeout=10)
                    if probe.returncode == 0 and probe.stdout.strip() == peer.hostname:
                        break
                    if peer.unshare.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"sshd of {peer.hostname} not reachable from {host.hostname}: "
                            f"{probe.stderr.strip()}\n{self.sshd_log(peer)}"
                        )
                    time.sleep(0.2)

    # -- using it ---------------------------------------------------------------------------------------

    def env(self, **extra: str) -> Dict[str, str]:
        """The environment for commands on a host: our ssh first on PATH."""
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}:{env['PATH']}"
        env.pop("TMPDIR", None)
        env.update(extra)
        return env

    def _enter(self, host: Host) -> List[str]:
        return ["nsenter", "-t", str(host.sshd), "-n", "-u", "-m", "-p", "--"]

    def popen(self, host: Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a command on `host` (in its network, UTS and mount namespaces)."""
        kwargs.setdefault("env", self.env())
        return subprocess.Popen([*self._enter(host), *argv], **kwargs)

    def run(
        self, host: Host, argv: Sequence[str], timeout: float = 300, **kwargs
    ) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        return subprocess.run(
            [*self._enter(host), *argv], capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def on_disk(self, host: Host, path: str) -> str:
        """Where `path` under /tmp on `host` lies on this machine's disk."""
        assert path.startswith("/tmp/")
        return os.path.join(host.private, "tmp", path[len("/tmp/") :])

    def hosts_arg(self, hosts: Optional[Sequence[Host]] = None) -> str:
        return ",".join(f"{h.address}:{self.slots}" for h in (hosts or self.hosts))

    def pids(self, host: Host) -> List[int]:
        out = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, host: Host) -> List[int]:
        """SIGKILL every process of the host (its sshd, the ranks it runs, their launchers' sessions)."""
        killed: List[int] = []
        for _ in range(50):
            pids = self.pids(host)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if host.unshare is not None:
            try:
                host.unshare.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return killed

    def delete_pods(self, hosts: Sequence[Host], grace: float) -> List[PodEnd]:
        """Delete pods as kubelet does: SIGTERM to each one's pid 1 at once, SIGKILL to whatever of a pod
        is left after `grace` seconds. The pods' network namespaces stay (restart_host brings them back)."""
        started = time.monotonic()
        for host in hosts:
            os.kill(host.sshd, signal.SIGTERM)
        ends = {}
        while len(ends) < len(hosts) and time.monotonic() - started < grace:
            for host in hosts:
                if host.name not in ends and host.unshare.poll() is not None and not self.pids(host):
                    ends[host.name] = PodEnd(host, host.unshare.returncode, time.monotonic() - started, [])
            time.sleep(0.05)
        for host in hosts:
            if host.name not in ends:
                ends[host.name] = PodEnd(host, None, time.monotonic() - started, self.kill_host(host))
        return [ends[h.name] for h in hosts]

    def restart_host(self, *hosts: Host) -> None:
        """The hosts come back (a reboot): new hostname and mount namespaces, their sshd, their disks as they
        were."""
        for host in hosts:
            self._start(host)
        self._wait_for_sshd()

    def sshd_log(self, host: Host) -> str:
        try:
            with open(os.path.join(host.private, "sshd.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    # -- removing it ------------------------------------------------------------------------------------

    def down(self) -> None:
        for host in self.hosts:
            if host.name in self.namespaces:
                self.kill_host(host)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        if self.made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
