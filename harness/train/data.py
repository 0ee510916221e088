"""The data: `download_data()` once per machine, then `make_data_loaders()` on every rank.

Which machine a rank is on is Horovod's answer (cross rank, or the block of ranks from a local rank 0), not
the hostname's; an error or a stop anywhere ends every rank with it, so no rank waits for a download that
will never come.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from harness.api import trial as trial_api
from harness.definition import ModelDefinition
from harness.distributed import watchdog
from harness.distributed.backend import Backend
from harness.distributed.preemption import StopRequested
from harness.errors import HarnessError, Interrupted
from harness.train.builders import call_user


def make_loaders(
    model_def: ModelDefinition,
    config_dict: Dict[str, Any],
    hparams: Dict[str, Any],
    backend: Backend,
    download_timeout: Optional[float] = None,
    stop: Any = None,
) -> Tuple[Any, Any]:
    """download_data() once per machine, then make_data_loaders() on every rank: (training, validation)."""
    data_dir = download_once_per_machine(model_def, config_dict, hparams, backend, download_timeout, stop)
    trial_api._set_context(hparams, data_dir)
    args = (config_dict, hparams, data_dir) if model_def.loaders_take_dir else (config_dict, hparams)
    loaders = call_user(model_def.make_data_loaders, model_def, "make_data_loaders()", *args)
    return check_loader_pair(loaders)


def check_loader_pair(loaders: Any) -> Tuple[Any, Any]:
    if not isinstance(loaders, (tuple, list)) or len(loaders) != 2:
        raise HarnessError(
            f"make_data_loaders() returned a {type(loaders).__name__}; expected a pair (training, validation)"
        )
    return loaders[0], loaders[1]


def download_once_per_machine(
    model_def: ModelDefinition,
    config_dict: Dict[str, Any],
    hparams: Dict[str, Any],
    backend: Backend,
    download_timeout: Optional[float] = None,
    stop: Any = None,
) -> Optional[str]:
    """Local rank 0 of each machine runs download_data; the exchange below is everyone's barrier.

    Each rank contributes (host, outcome); an error anywhere ends every rank with that error, so no rank
    is left waiting for a download that will never come.
    """
    if model_def.download_data is None:
        return None
    watchdog.current().phase("download_data()", limit=download_timeout)
    outcome: Optional[Tuple[str, str]] = None
    if backend.local_rank == 0:
        try:
            args: Tuple[Any, ...] = (config_dict, hparams)
            if model_def.download_takes_dir:  # PEDL's 3-argument form: a directory to download into
                args += (machine_data_dir(model_def.directory, config_dict),)
            with stop.interruptible() if stop is not None else contextlib.nullcontext():
                path = call_user(model_def.download_data, model_def, "download_data()", *args)
            if path is None and model_def.download_takes_dir:
                path = args[2]  # it filled the directory it was given
            if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
                raise HarnessError(f"download_data() returned {path!r}, which is not an existing directory")
            outcome = ("ok", os.path.abspath(path))
        except HarnessError as e:
            outcome = ("error", str(e))
        except StopRequested as e:  # SIGTERM / Ctrl-C: abandon the download; every rank stops
            outcome = ("stopped", str(e))
    me = (backend.local_rank, backend.local_size, backend.cross_rank, socket.gethostname())
    everyone = backend.allgather_object((me, outcome))
    for _, theirs in everyone:
        if theirs is not None and theirs[0] == "error":
            raise HarnessError(theirs[1])
    for _, theirs in everyone:
        if theirs is not None and theirs[0] == "stopped":
            code = 130 if theirs[1] == "SIGINT" or (stop is not None and stop.exit_code) else 0
            raise Interrupted(f"stopped by {theirs[1]} during download_data(); nothing trained yet", code)
    watchdog.current().phase(watchdog.SETUP)
    machine = machines([who for who, _ in everyone])
    mine = [o for m, (_, o) in zip(machine, everyone) if m == machine[backend.rank] and o is not None]
    if not mine:
        raise HarnessError(f"no rank with local rank 0 ran download_data() on {socket.gethostname()}")
    return mine[0][1]


def machine_data_dir(model_dir: str, config_dict: Dict[str, Any]) -> str:
    """The directory a 3-argument download_data() downloads into: on this machine's own disk (under
    $HARNESS_DATA_DIR, else $TMPDIR/harness-data), one per model definition and data section, kept between
    runs (so a download that skips what is there is done once per machine, not once per run)."""
    key = json.dumps([os.path.abspath(model_dir), config_dict.get("data") or {}], sort_keys=True, default=str)
    name = f"{os.path.basename(os.path.abspath(model_dir))}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    root = os.environ.get("HARNESS_DATA_DIR") or os.path.join(tempfile.gettempdir(), "harness-data")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def machines(ranks: List[Tuple[int, int, int, str]]) -> List[Any]:
    """Which machine each rank is on, from (local rank, local size, cross rank, hostname) of every rank.

    Horovod's own view, not hostnames (containers and cloud images often share one): where every machine
    runs as many ranks, a machine is a cross rank (Horovod's cross communicator holds one rank per machine,
    in the same machine order for every local rank, however ranks are mapped). Otherwise a machine is the
    block of ranks that starts at its local rank 0 (horovodrun and mpirun's default mapping fill machines
    one after another). Only a mapping that fits neither falls back to hostnames.
    """
    if len({size for _, size, _, _ in ranks}) == 1:
        return [cross for _, _, cross, _ in ranks]
    firsts = []
    for rank, (local, size, _, _) in enumerate(ranks):
        first = rank - local
        block = ranks[first : first + size] if first >= 0 else []
        if (
            len(block) != size
            or [b[0] for b in block] != list(range(size))
            or {b[1] for b in block} != {size}
        ):
            return [host for _, _, _, host in ranks]
        firsts.append(first)
    return firsts
