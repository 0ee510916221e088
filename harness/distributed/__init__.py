"""Ranks and their collectives: which backend this process runs under, and the threads it may use.

`init()` returns a `Horovod` backend when the process runs under horovodrun or mpirun as one of several ranks,
a `TorchDistributed` one (torch_ddp.py) under torchrun or with HARNESS_BACKEND=torch, and a `Local` one for a
single process, so `harness ./model_def` works without MPI and unit tests need no Horovod. Every backend
implements `Backend` (backend.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from harness.distributed.backend import Backend
from harness.distributed.chief import run_on_chief
from harness.distributed.horovod import Horovod
from harness.distributed.local import Local
from harness.distributed.torch_ddp import TorchDistributed, peer_failure, torchrun_environment
from harness.errors import HarnessError

__all__ = [
    "Backend",
    "Horovod",
    "Local",
    "TorchDistributed",
    "chosen_backend",
    "env_rank",
    "init",
    "peer_failure",
    "run_on_chief",
    "set_threads",
    "under_launcher",
]

_LAUNCHER_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
BACKEND_ENV = "HARNESS_BACKEND"  # horovod | torch; unset: by the launcher's environment


def chosen_backend() -> str:
    """ "horovod" or "torch": HARNESS_BACKEND if set, else "torch" under torchrun and "horovod" otherwise."""
    chosen = os.environ.get(BACKEND_ENV, "").strip().lower()
    if chosen not in ("", "horovod", "torch"):
        raise HarnessError(f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r}: expected 'horovod' or 'torch'")
    if chosen:
        return chosen
    horovod_launched = any(v in os.environ for v in _LAUNCHER_VARS)
    return "torch" if torchrun_environment() and not horovod_launched else "horovod"


def under_launcher() -> bool:
    """Whether a launcher (horovodrun, mpirun, an MPI operator, torchrun) started this process as one of N."""
    return any(v in os.environ for v in _LAUNCHER_VARS) or torchrun_environment()


def env_rank() -> int:
    """This process's rank as the launcher's environment tells it, before any init (0 if none)."""
    for v in _LAUNCHER_VARS:
        if v in os.environ:
            return int(os.environ[v])
    if torchrun_environment():
        return int(os.environ["RANK"])
    return 0


def init() -> Backend:
    """Start the chosen backend when a launcher started us as one of several ranks; run as one local process
    when there is only one."""
    if chosen_backend() == "torch":
        if not torchrun_environment() or int(os.environ["WORLD_SIZE"]) == 1:
            return Local()
        return TorchDistributed()
    if not any(v in os.environ for v in _LAUNCHER_VARS):
        return Local()
    try:
        backend = Horovod()
    except ImportError as e:
        raise HarnessError(
            f"Horovod cannot be imported ({e}); run with the torch backend instead: "
            "`harness launch --backend torch`, or torchrun --nproc-per-node N -m harness DIR"
        ) from None
    return backend if backend.size > 1 else Local(backend.controller, backend.hvd)


def torch_threads() -> int:
    return torch.get_num_threads()


def set_threads(backend: Backend, threads_before_user_code: Optional[int] = None) -> None:
    """Split the machine's cores among the ranks on it, so that they do not oversubscribe it; unless the user
    chose: OMP_NUM_THREADS in the environment, or torch.set_num_threads() in the model definition's code
    (the count differs from `threads_before_user_code`)."""
    if "OMP_NUM_THREADS" in os.environ:
        return  # torch took it at start
    if threads_before_user_code is not None and torch.get_num_threads() != threads_before_user_code:
        return
    torch.set_num_threads(max(1, available_cores() // backend.local_size))


def available_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity (taskset, a cpuset), capped by a CPU quota (a
    container's or pod's CPU limit, cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`), rounded up. os.cpu_count()
    counts the host's: a pod limited to 2 CPUs on a 64-core node would run 64 threads per rank."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return max(1, min(cores, quota)) if quota is not None else max(1, cores)


def _cpu_quota(cgroup: str) -> Optional[int]:
    v2 = _read(os.path.join(cgroup, "cpu.max")).split()  # "max 100000", or "150000 100000": 1.5 CPUs
    quota, period = (
        v2[:2]
        if len(v2) >= 2
        else (
            _read(os.path.join(cgroup, "cpu", "cpu.cfs_quota_us")),  # cgroup v1: -1 is no limit
            _read(os.path.join(cgroup, "cpu", "cpu.cfs_period_us")),
        )
    )
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max", or no cgroup files
        return None
    return -(-q // p) if q > 0 and p > 0 else None  # rounded up: 1.5 CPUs keep 2 threads partly busy


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
