"""From a model definition to the objects the loop trains: trial, batch size, data, model, optimizer.

Each user function that runs once is called through `call_user`, so that an error in it is one line
naming the function and the user's file and line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from harness import trial as trial_api
from harness import watchdog
from harness.definition import ModelDefinition, positional_arity, user_frame
from harness.errors import HarnessError, Interrupted, describe
from harness.lr_scheduler import LRScheduler
from harness.preemption import StopRequested
from harness.trial import defines


def call_user(fn: Any, model_def: ModelDefinition, what: str, *args: Any) -> Any:
    """Call user code that runs once; name it in the error if it raises."""
    try:
        return fn(*args)
    except HarnessError:
        raise
    except Exception as e:  # noqa: BLE001
        where = user_frame(e.__traceback__, model_def.directory)
        raise HarnessError(f"{what} raised {describe(e)}" + (f" (at {where})" if where else "")) from e


def make_trial(model_def: ModelDefinition, hparams: Dict[str, Any]) -> Any:
    cls = model_def.trial_class
    takes_hparams = cls.__init__ is not object.__init__ and positional_arity(cls.__init__) > 1
    args = (hparams,) if takes_hparams else ()
    return call_user(cls, model_def, f"{cls.__name__}()", *args)


def global_batch_size(trial: Any, model_def: ModelDefinition, hparams: Dict[str, Any], ranks: int) -> int:
    """The global batch: ``batch_size()`` if the trial defines it, else the hyperparameter
    ``global_batch_size`` (Determined's name) or ``batch_size`` (PEDL's). It must split evenly over ranks."""
    if defines(type(trial), "batch_size"):
        value = call_user(trial.batch_size, model_def, "batch_size()")
        said, what = f"batch_size() returned {value!r}", f"batch_size() is {value}"
    else:
        name = next((n for n in ("global_batch_size", "batch_size") if n in hparams), None)
        if name is None:
            raise HarnessError(
                f"no global batch size: define batch_size() in class {type(trial).__name__}, or set the "
                "hyperparameter global_batch_size (or PEDL's batch_size) in the config"
            )
        value = hparams[name]
        said = what = f"the hyperparameter '{name}' is {value!r}"
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HarnessError(f"{said}; expected a positive integer")
    if value % ranks:
        raise HarnessError(
            f"{what}, not divisible by the {ranks} ranks (it is the global batch; each rank takes 1/{ranks})"
        )
    return value


def build_model(trial: Any, model_def: ModelDefinition, hparams: Dict[str, Any]) -> torch.nn.Module:
    args = (hparams,) if positional_arity(trial.build_model) >= 1 else ()
    model = call_user(trial.build_model, model_def, "build_model()", *args)
    if not isinstance(model, torch.nn.Module):
        raise HarnessError(f"build_model() returned a {type(model).__name__}; expected a torch.nn.Module")
    return model


def build_optimizer(
    trial: Any, model_def: ModelDefinition, model: torch.nn.Module, hparams: Dict[str, Any]
) -> Any:
    args = (model, hparams) if positional_arity(trial.optimizer) >= 2 else (model,)
    opt = call_user(trial.optimizer, model_def, "optimizer()", *args)
    if not isinstance(opt, torch.optim.Optimizer):
        raise HarnessError(f"optimizer() returned a {type(opt).__name__}; expected a torch.optim.Optimizer")
    return opt


def build_lr_scheduler(trial: Any, model_def: ModelDefinition, optimizer: Any) -> Optional[LRScheduler]:
    """The trial's ``create_lr_scheduler(optimizer)``, if it defines one (None may be returned too)."""
    if not defines(type(trial), "create_lr_scheduler"):
        return None
    sched = call_user(trial.create_lr_scheduler, model_def, "create_lr_scheduler()", optimizer)
    if sched is not None and not isinstance(sched, LRScheduler):
        raise HarnessError(
            f"create_lr_scheduler() returned a {type(sched).__name__}; expected "
            "LRScheduler(scheduler, step_mode=...) from pedl.frameworks.pytorch or harness"
        )
    return sched


def make_loaders(
    model_def: ModelDefinition,
    config_dict: Dict[str, Any],
    hparams: Dict[str, Any],
    backend: Any,
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
    backend: Any,
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
    watchdog.current().phase("set-up")
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


def pick_device(backend: Any) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(backend.local_rank)
        return torch.device("cuda", backend.local_rank)
    return torch.device("cpu")


def agree_on_seed(config_seed: Optional[int], backend: Any, resumed: Optional[Dict[str, Any]]) -> int:
    seed = config_seed
    if seed is None and resumed:
        seed = resumed["seed"]  # a drawn seed is kept across restarts
    if seed is None:
        seed = backend.broadcast_object(random.SystemRandom().randrange(2**31) if backend.rank == 0 else None)
    return seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
