"""Using a trained model: `harness evaluate`, `harness export` and `load_trial`.

The config is the checkpoint's own (state.json: the effective config the run trained and validated with,
whichever file it came from), so evaluating reproduces training's validation. `--config FILE` replaces it
(e.g. its `data` section, for a test set; its mixed precision), except for what defines the trained model —
hyperparameters, trial class, seed — which stay the checkpoint's; differences are said. `harness evaluate`
runs validation as training does (the trial's adapter: exact, weighted by records, sharded across ranks)
and reads nothing in the training output directory but the checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from harness import config as config_mod
from harness import distributed
from harness.api import trial as trial_api
from harness.api.trial import LOSSES_API
from harness.config import optimizations
from harness.distributed import watchdog
from harness.distributed.backend import Backend
from harness.errors import HarnessError, say
from harness.output import checkpoint, provenance
from harness.train import resume, setup
from harness.train.report import format_metrics


def find_checkpoint(path: str) -> str:
    """The checkpoint folder `path` names: itself, the one OUTPUT/checkpoints/latest names, or the newest
    under OUTPUT (or OUTPUT/checkpoints). Cheap (no checksums): every rank resolves it alike."""
    if not os.path.exists(path):
        raise HarnessError(f"checkpoint {path} does not exist")
    if os.path.isfile(path) and os.path.basename(path) == "latest":
        with open(path) as f:
            return os.path.join(os.path.dirname(path), f.read().strip())
    if os.path.isfile(os.path.join(path, checkpoint.STATE)):
        return path
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    newest = checkpoint.checkpoint_dirs(root)
    if not newest:
        raise HarnessError(
            f"{path} is not a checkpoint folder and holds none (a checkpoint is "
            "OUTPUT/checkpoints/<batches>, with state.json and model.pt)"
        )
    return os.path.join(root, str(newest[0]))


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """The checkpoint's model state_dict, after its checksums are verified; tensors only (weights_only)."""
    problem = checkpoint.verify(path)
    if problem:
        raise HarnessError(f"checkpoint {path} is corrupt: {problem}")
    return checkpoint.load_tensors(os.path.join(path, "model.pt"))


def effective_config(
    model_dir: str, explicit: Optional[str], ckpt: str, state: Dict[str, Any]
) -> Tuple[config_mod.ExperimentConfig, List[str]]:
    """The config to evaluate with (module docstring), and warnings to show once."""
    saved = state.get("config") or {}
    if saved and explicit is None:  # what the run trained and validated with, whichever file it came from
        cfg, path, said = config_mod.parse_config(saved, f"{ckpt}/{checkpoint.STATE}"), None, []
    else:  # --config, or a checkpoint without its config: the model directory's
        directory = os.path.dirname(model_dir) if os.path.isfile(model_dir) else model_dir
        path = config_mod.find_config_file(directory, explicit)
        if path is None:
            raise HarnessError(f"no config: checkpoint {ckpt} has none, nor has {directory}; pass --config")
        cfg = config_mod.load_config(path)
        said = list(cfg.warnings)
    trained = state.get("hparams", saved.get("hyperparameters", {}))
    if path is not None and cfg.hyperparameters != trained:
        names = sorted(
            k for k in {*cfg.hyperparameters, *trained} if cfg.hyperparameters.get(k) != trained.get(k)
        )
        said.append(
            f"{path}: hyperparameters {', '.join(names)} differ from checkpoint {ckpt}'s; evaluating with "
            "the checkpoint's (what the model was trained with)"
        )
    if path is not None and saved:
        precision = (saved.get("optimizations") or {}).get("mixed_precision")
        if precision != cfg.optimizations.mixed_precision:
            said.append(
                f"{path}: mixed_precision {cfg.optimizations.mixed_precision} (trained with {precision})"
            )
        if saved.get("data", {}) != cfg.data:
            said.append(f"{path}: the data section differs from checkpoint {ckpt}'s; evaluating on {path}'s")
    cfg.hyperparameters = dict(trained)
    if saved:  # where the trial class and data functions were found in training
        trained_with = config_mod.parse_config(
            {k: saved[k] for k in ("entrypoint", "entrypoints") if k in saved}
        )
        cfg.entrypoint, cfg.entrypoints = trained_with.entrypoint, trained_with.entrypoints
    seed = state.get("seed", cfg.reproducibility.experiment_seed)
    cfg.reproducibility.experiment_seed = seed if seed is not None else 0
    return cfg, said


def _seed(cfg: config_mod.ExperimentConfig) -> int:
    seed = cfg.reproducibility.experiment_seed
    assert seed is not None, "effective_config sets it"
    return seed


def _validation_loader(parts: Any, cfg: config_mod.ExperimentConfig, backend: Backend) -> Any:
    """The trial's validation loader (make_data_loaders()'s after download_data(), or the trial's own)."""
    val_loader = setup.trial_validation_loader(parts, cfg, backend)
    if val_loader is None:
        own = parts.model_def.make_data_loaders is None  # a Determined trial's own loaders
        which = "build_validation_data_loader()" if own else "make_data_loaders()"
        raise HarnessError(f"{which} returned no validation loader (None): nothing to evaluate")
    return val_loader


def _fit(model: torch.nn.Module, weights: Dict[str, torch.Tensor], ckpt: str, model_dir: str) -> None:
    hint = f"is {model_dir} the model definition it was trained from?"
    resume.check_model(model, weights, ckpt, doing="load", hint=hint)
    model.load_state_dict(weights)


def evaluate(model_def: Any, cfg: config_mod.ExperimentConfig, ckpt: str, backend: Backend) -> Dict[str, Any]:
    """The checkpoint's validation metrics, on every rank: the loop's validation, with its autocast."""
    watchdog.current().phase(watchdog.SETUP)
    parts = setup.start_trial(model_def, cfg, backend, _seed(cfg))  # as training built it
    device, options, adapter = parts.device, parts.options, parts.adapter
    optimizations.check_device(options, device)
    val_loader = adapter.validation_loader(
        _validation_loader(parts, cfg, backend), backend.rank, backend.size
    )
    model = setup.trial_model(parts, cfg.hyperparameters).to(device)
    problem = None
    if backend.rank == 0:  # rank 0 reads the weights; every rank learns whether they fit
        try:
            _fit(model, load_weights(ckpt), ckpt, model_def.directory)
        except HarnessError as e:
            problem = str(e)
    problem = backend.broadcast_object(problem)
    if problem:
        raise HarnessError(problem)
    backend.broadcast_model(model)
    setup.seed_everything(_seed(cfg) + backend.rank)
    watchdog.current().phase("evaluation")
    with options.autocast(device.type):
        metrics = adapter.evaluate(model, val_loader, device, backend)
    assert metrics is not None, "None only when a stop abandons it, and no stop is passed"
    return metrics


def evaluate_command(args: argparse.Namespace, fail: Optional[Callable[..., None]] = None) -> int:
    from harness import definition

    ckpt = find_checkpoint(args.checkpoint)
    state = checkpoint.read_state(ckpt)
    cfg, said = effective_config(args.model_dir, args.config, ckpt, state)
    rank = distributed.env_rank()
    for line in said if rank == 0 else []:
        say(f"harness: warning: {line}", sys.stderr)
    if fail is not None:  # the stall watchdog, as in training
        watchdog.start(rank, cfg.stall_timeout, args.model_dir, lambda m, c: fail(m, 1, c), cfg.setup_timeout)
    threads = distributed.torch_threads()
    model_def = definition.load_for(args.model_dir, cfg)
    backend = distributed.init()
    distributed.set_threads(backend, threads)
    metrics = evaluate(model_def, cfg, ckpt, backend)
    if backend.rank == 0:
        batches = state.get("progress", {}).get("batches")
        say(f"[evaluation] checkpoint {ckpt} (batch {batches})  {format_metrics(metrics)}")
        if args.output:
            os.makedirs(args.output, exist_ok=True)
            record = {"type": "evaluation", "checkpoint": os.path.abspath(ckpt), "batches": batches}
            record.update(metrics=metrics, ranks=backend.size, time=time.time())
            with open(os.path.join(args.output, "evaluations.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
    backend.shutdown()
    return 0


def _load(
    checkpoint_dir: str,
    model_dir: Optional[str],
    device: Any = "cpu",
    flag: str = "model_dir=",
) -> SimpleNamespace:
    """load_trial's work, with what export needs besides (the definition, the config, the adapter)."""
    from harness import definition

    ckpt = find_checkpoint(os.fspath(checkpoint_dir))
    state = checkpoint.read_state(ckpt)
    if model_dir is not None:
        directory = os.fspath(model_dir)
    else:  # the folder the checkpoint names, where that is safe (output/provenance.py), and said
        directory = provenance.recorded_definition(state, ckpt, flag)
        say(
            f"harness: importing the model definition in {directory} (named by checkpoint {ckpt}; its "
            f"{len(state['model_files'])} .py files are those it was trained with)",
            sys.stderr,  # stdout may be the caller's data (export prints the file it wrote there)
        )
    cfg, _ = effective_config(directory, None, ckpt, state)
    model_def = definition.load_for(directory, cfg)
    parts = setup.start_trial(model_def, cfg, distributed.Local(), _seed(cfg))
    model = setup.trial_model(parts, cfg.hyperparameters)
    _fit(model, load_weights(ckpt), ckpt, model_def.directory)
    model.to(device).eval()
    return SimpleNamespace(
        trial=parts.trial, model=model, adapter=parts.adapter, model_def=model_def, cfg=cfg, parts=parts
    )


def load_trial(checkpoint_dir: str, model_dir: Optional[str] = None, device: Any = "cpu") -> Tuple[Any, Any]:
    """(trial, model) of a checkpoint, for inference in this process: the model holds the checkpoint's
    weights, on `device`, in eval mode; the trial is built with the checkpoint's hyperparameters (so
    `harness.get_hyperparameter` works, in the trial's methods for its own checkpoint). `model_dir`: the
    model definition, by default the directory the checkpoint names (checkpoints written before it was
    recorded need it passed)."""
    loaded = _load(checkpoint_dir, model_dir, device)
    _keep_own_context(loaded.trial)
    return loaded.trial, loaded.model


def _keep_own_context(trial: Any) -> None:
    """The trial's own methods (those of its model definition's classes) run with its checkpoint's
    hyperparameters, config and seed as `harness.get_hyperparameter` & co. answer them: a trial loaded
    earlier does not answer for a checkpoint loaded after it. (A Determined context holds its own.)"""
    own = dict(trial_api._context)
    for cls in type(trial).__mro__:
        if cls.__module__.split(".")[0] in ("harness", "builtins", "pedl", "determined"):
            continue
        for name, attr in vars(cls).items():
            if inspect.isfunction(attr) and not name.startswith("__") and name not in vars(trial):
                setattr(trial, name, _running_as(getattr(trial, name), own))


def _running_as(method: Callable[..., Any], own: Dict[str, Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        before = dict(trial_api._context)
        trial_api._context.update(own)
        try:
            return method(*args, **kwargs)
        finally:
            trial_api._context.update(before)

    return call


def _first_input(loaded: SimpleNamespace) -> Any:
    """The model's input in the first validation batch, as the adapter prepares it (on the CPU)."""
    loader = _validation_loader(loaded.parts, loaded.cfg, distributed.Local())
    where = "validation batch 1"
    batch, _ = loaded.adapter.prepare(next(iter(loader)), torch.device("cpu"), where, False)
    if loaded.adapter.api == LOSSES_API or (isinstance(batch, (tuple, list)) and len(batch) == 2):
        return batch[0]  # (input, target); evaluate_batch() trials: taken to be (input, labels) too
    raise HarnessError(f"{where} is not a pair (input, target): cannot tell which part is the model's input")


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _torchscript(loaded: SimpleNamespace) -> Any:
    """torch.jit.script of the model, else its trace on the first validation batch's input."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation (torch 2.13), the tracer's warnings
        try:
            return torch.jit.script(loaded.model)
        except Exception as e:  # noqa: BLE001 - any failure to script is followed by a trace
            scripted = _first_line(e)
        try:
            traced = torch.jit.trace(loaded.model, (_first_input(loaded),), strict=False)
        except Exception as e:  # noqa: BLE001
            raise HarnessError(
                f"cannot export as torchscript: torch.jit.script failed ({scripted}); torch.jit.trace with "
                f"the first validation batch's input failed ({_first_line(e)}); use --format state_dict"
            ) from None
    say(
        f"harness: torch.jit.script failed ({scripted}); traced with the first validation batch's input "
        "instead (the trace follows that batch's control flow)",
        sys.stderr,
    )
    return traced


def export_target(path: str, force: bool) -> str:
    """The absolute path `harness export` may write (checked before the model is loaded): not a folder,
    not an existing file unless `force`, in a folder that exists (or can be made) and is writable."""
    out = os.path.abspath(path)
    if os.path.isdir(out):
        raise HarnessError(f"--out {path} is a folder; name the file to write")
    if os.path.lexists(out) and not force:
        raise HarnessError(f"--out {path} exists; pass --force to overwrite it")
    folder = os.path.dirname(out)
    parent = folder
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise HarnessError(f"--out {path}: {parent} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise HarnessError(f"--out {path}: cannot make the folder {folder} ({e.strerror})") from None
    return out


def write_atomic(out: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` into a temporary file beside `out`, then rename it to `out`: a failure (a full disk, a
    read-only file system) leaves no half-written file, and `out` as it was."""
    folder = os.path.dirname(out)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
    except OSError as e:
        raise HarnessError(f"cannot write {out}: {e.strerror} (in {folder})") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
        os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001 - torch reports write failures as RuntimeErrors (c10::Error)
        why = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
        raise HarnessError(f"cannot write {out}: {why}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_command(args: argparse.Namespace) -> int:
    out = export_target(args.out, getattr(args, "force", False))
    loaded = _load(args.checkpoint, args.model_dir, "cpu", "--model-dir ")
    if args.format == "state_dict":
        state = loaded.model.state_dict()
        write_atomic(out, lambda tmp: torch.save(state, tmp))
    else:
        scripted = _torchscript(loaded)
        write_atomic(out, lambda tmp: scripted.save(tmp))
    say(out)
    return 0


def run(args: argparse.Namespace, fail: Optional[Callable[..., None]] = None) -> int:
    return evaluate_command(args, fail) if args.command == "evaluate" else export_command(args)
