"""Ranks and their collectives: which backend this process runs under, and the threads it may use.

`init()` returns a `Horovod` backend when the process runs under a launcher (horovodrun, mpirun) as one of
several ranks, and a `Local` one otherwise, so `harness ./model_def` works without MPI and unit tests need no
Horovod. Every backend implements `Backend` (backend.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from harness.distributed.backend import Backend
from harness.distributed.chief import run_on_chief
from harness.distributed.horovod import Horovod
from harness.distributed.local import Local

__all__ = ["Backend", "Horovod", "Local", "env_rank", "init", "run_on_chief", "set_threads", "under_launcher"]

_LAUNCHER_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def under_launcher() -> bool:
    """Whether a launcher (horovodrun, mpirun, an MPI operator) started this process as one of N ranks."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def env_rank() -> int:
    """This process's rank as the launcher's environment tells it, before any init (0 if none)."""
    for v in _LAUNCHER_VARS:
        if v in os.environ:
            return int(os.environ[v])
    return 0


def init() -> Backend:
    """Start Horovod when a launcher started us; run as one local process when there is only one rank."""
    if not under_launcher():
        return Local()
    backend = Horovod()
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
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // backend.local_size))
