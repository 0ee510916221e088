"""The training loop: the hand-written Horovod loop, plus the harness's duties (sharding, metrics, checks).

Read `train` top to bottom: set-up, then the epoch loop with its report and validation points.
"""

from __future__ import annotations

import math
import os
import random
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from harness import trial as trial_api
from harness.config import ExperimentConfig
from harness.data import (
    batch_records,
    shard_training_loader,
    shard_validation_loader,
    split_batch,
    to_device,
)
from harness.definition import ModelDefinition, positional_arity, user_frame
from harness.errors import HarnessError
from harness.metrics import MetricAccumulator, Reporter, first_nonfinite


@dataclass
class Progress:
    """Where training stands, in global units (the same on every rank)."""

    batches: int = 0
    records: int = 0
    batches_per_epoch: int = 1
    window_start: int = 0  # first batch of the current report window
    window_losses: List[torch.Tensor] = field(default_factory=list)

    @property
    def epoch(self) -> float:
        return self.batches / self.batches_per_epoch


def train(
    model_def: ModelDefinition, config: ExperimentConfig, output_dir: str, backend: Any
) -> Dict[str, Any]:
    """Train the trial as `config` says; returns the last validation metrics."""
    device = _pick_device(backend)
    config.reproducibility.experiment_seed = seed = _agree_on_seed(config, backend)
    hparams = config.hyperparameters
    config_dict = config.as_dict()
    trial_api._set_context(hparams, None)
    _seed_everything(seed)
    is_chief = backend.rank == 0
    if is_chief:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_dict, f, sort_keys=False)

    trial = _make_trial(model_def, hparams)
    global_batch = _call_user(trial.batch_size, model_def, "batch_size()")
    per_rank_batch = _per_rank_batch(global_batch, backend.size)

    # Data: downloaded once per machine, then every rank's loaders, sharded across ranks.
    data_dir = _download_once_per_machine(model_def, config_dict, hparams, backend)
    trial_api._set_context(hparams, data_dir)
    loaders = _call_user(model_def.make_data_loaders, model_def, "make_data_loaders()", config_dict, hparams)
    train_loader, val_loader = _check_loader_pair(loaders)
    train_loader, sampler = shard_training_loader(
        train_loader, per_rank_batch, backend.rank, backend.size, seed
    )
    val_loader = shard_validation_loader(val_loader, backend.rank, backend.size)

    # Model and optimizer: built on every rank from the same seed, then rank 0's state is broadcast.
    model = _build_model(trial, model_def, hparams).to(device)
    optimizer = backend.wrap_optimizer(_build_optimizer(trial, model_def, model, hparams), model)
    backend.broadcast_state(model, optimizer)
    _seed_everything(seed + backend.rank)  # per-rank randomness (dropout, augmentation) from here on

    progress = Progress(batches_per_epoch=len(train_loader))
    total = config.searcher.max_length.to_batches(progress.batches_per_epoch, global_batch)
    period = config.min_validation_period
    validate_every = period.to_batches(progress.batches_per_epoch, global_batch) if period else None
    reporter = Reporter(output_dir, enabled=is_chief)
    train_metrics = MetricAccumulator(device, "losses()/training_metrics()")
    non_blocking = device.type == "cuda"
    last_validation: Dict[str, Any] = {}

    model.train()
    epoch = 0
    while progress.batches < total:
        sampler.set_epoch(epoch)
        for batch in train_loader:
            where = f"training batch {progress.batches + 1}"
            inputs, labels = split_batch(batch, where)
            inputs = to_device(inputs, device, f"{where} input", non_blocking)
            labels = to_device(labels, device, f"{where} target", non_blocking)

            predictions = model(inputs)
            losses = trial.losses(predictions, labels)
            loss = _loss_tensor(losses, where)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            # Harness duties: metrics stay on the device until the next report.
            with torch.no_grad():
                extra = trial.training_metrics(predictions, labels, losses)
                train_metrics.add({**(extra or {}), **_loss_metrics(losses, loss)})
            progress.window_losses.append(loss.detach())
            progress.batches += 1
            progress.records += batch_records(inputs, labels, where) * backend.size

            done = progress.batches >= total
            if done or progress.batches % config.scheduling_unit == 0:
                _report_training(train_metrics, progress, reporter, backend)
            if done or (validate_every and progress.batches % validate_every == 0):
                last_validation = validate(trial, model, val_loader, device, backend)
                _check_searcher_metric(config, last_validation)
                reporter.report(
                    "validation", progress.batches, progress.epoch, progress.records, last_validation
                )
            if done:
                break
        epoch += 1

    reporter.close()
    if is_chief:
        print(f"results: {os.path.abspath(reporter.path)}", flush=True)
    return last_validation


def validate(
    trial: Any, model: torch.nn.Module, loader: Any, device: torch.device, backend: Any
) -> Dict[str, Any]:
    """Exact validation: each batch weighted by its records, summed over all ranks, divided by the total."""
    metrics = MetricAccumulator(device, "validation_metrics()")
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            where = f"validation batch {i + 1} of rank {backend.rank}"
            inputs, labels = split_batch(batch, where)
            inputs = to_device(inputs, device, f"{where} input")
            labels = to_device(labels, device, f"{where} target")
            predictions = model(inputs)
            losses = trial.losses(predictions, labels)
            metrics.add(
                trial.validation_metrics(predictions, labels, losses),
                weight=batch_records(inputs, labels, where),
            )
    model.train()
    return metrics.reduce(backend)


# ----------------------------------------------------------------------------------------------------------
# The duties, out of the way of the loop.


def _report_training(acc: MetricAccumulator, progress: Progress, reporter: Reporter, backend: Any) -> None:
    metrics = acc.reduce(backend)
    if not math.isfinite(metrics["loss"]):
        # Every rank sees the same reduced loss, so all take this branch; find the first bad batch anywhere.
        local = first_nonfinite(progress.window_losses)
        index = progress.window_start + local + 1 if local is not None else sys.maxsize
        first = int(backend.allreduce_min(torch.tensor([index], dtype=torch.int64)).item())
        raise HarnessError(f"the loss is not finite (NaN or inf) at training batch {first}; stopping")
    progress.window_losses.clear()
    progress.window_start = progress.batches
    reporter.report("training", progress.batches, progress.epoch, progress.records, metrics)


def _loss_tensor(losses: Any, where: str) -> torch.Tensor:
    """The tensor to minimise: `losses` itself or its "loss" entry; it must be a scalar."""
    loss = losses
    if isinstance(losses, dict):
        if "loss" not in losses:
            raise HarnessError(
                f"losses() returned a dict without the key 'loss' (keys: {', '.join(map(str, losses))})"
            )
        loss = losses["loss"]
    if not isinstance(loss, torch.Tensor):
        raise HarnessError(f"losses() returned a {type(loss).__name__} at {where}; expected a scalar tensor")
    if loss.numel() != 1:
        raise HarnessError(
            f"losses() returned a loss of shape {tuple(loss.shape)} at {where}; "
            "expected a scalar (reduce it, e.g. with .mean())"
        )
    return loss.reshape(())


def _loss_metrics(losses: Any, loss: torch.Tensor) -> Dict[str, Any]:
    if isinstance(losses, dict):
        return {**losses, "loss": loss}
    return {"loss": loss}


def _check_searcher_metric(config: ExperimentConfig, metrics: Dict[str, Any]) -> None:
    name = config.searcher.metric
    if name is not None and name not in metrics:
        raise HarnessError(
            f"config key 'searcher.metric': '{name}' is not a validation metric "
            f"(have: {', '.join(sorted(metrics))})"
        )


def _pick_device(backend: Any) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(backend.local_rank)
        return torch.device("cuda", backend.local_rank)
    return torch.device("cpu")


def _agree_on_seed(config: ExperimentConfig, backend: Any) -> int:
    seed = config.reproducibility.experiment_seed
    if seed is None:
        seed = backend.broadcast_object(random.SystemRandom().randrange(2**31) if backend.rank == 0 else None)
    return seed


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _per_rank_batch(global_batch: Any, size: int) -> int:
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch <= 0:
        raise HarnessError(f"batch_size() returned {global_batch!r}; expected a positive integer")
    if global_batch % size:
        raise HarnessError(
            f"batch_size() is {global_batch}, not divisible by the {size} ranks "
            "(it is the global batch; each rank takes batch_size() / ranks)"
        )
    return global_batch // size


def _call_user(fn: Any, model_def: ModelDefinition, what: str, *args: Any) -> Any:
    """Call user code that runs once; name it in the error if it raises."""
    try:
        return fn(*args)
    except HarnessError:
        raise
    except Exception as e:  # noqa: BLE001
        where = user_frame(e.__traceback__, model_def.directory)
        raise HarnessError(
            f"{what} raised {type(e).__name__}: {e}" + (f" (at {where})" if where else "")
        ) from e


def _make_trial(model_def: ModelDefinition, hparams: Dict[str, Any]) -> Any:
    cls = model_def.trial_class
    takes_hparams = cls.__init__ is not object.__init__ and positional_arity(cls.__init__) > 1
    args = (hparams,) if takes_hparams else ()
    return _call_user(cls, model_def, f"{cls.__name__}()", *args)


def _build_model(trial: Any, model_def: ModelDefinition, hparams: Dict[str, Any]) -> torch.nn.Module:
    args = (hparams,) if positional_arity(trial.build_model) >= 1 else ()
    model = _call_user(trial.build_model, model_def, "build_model()", *args)
    if not isinstance(model, torch.nn.Module):
        raise HarnessError(f"build_model() returned a {type(model).__name__}; expected a torch.nn.Module")
    return model


def _build_optimizer(
    trial: Any, model_def: ModelDefinition, model: torch.nn.Module, hparams: Dict[str, Any]
) -> Any:
    args = (model, hparams) if positional_arity(trial.optimizer) >= 2 else (model,)
    opt = _call_user(trial.optimizer, model_def, "optimizer()", *args)
    if not isinstance(opt, torch.optim.Optimizer):
        raise HarnessError(f"optimizer() returned a {type(opt).__name__}; expected a torch.optim.Optimizer")
    return opt


def _check_loader_pair(loaders: Any) -> Tuple[Any, Any]:
    if not isinstance(loaders, (tuple, list)) or len(loaders) != 2:
        raise HarnessError(
            f"make_data_loaders() returned a {type(loaders).__name__}; expected a pair (training, validation)"
        )
    return loaders[0], loaders[1]


def _download_once_per_machine(
    model_def: ModelDefinition, config_dict: Dict[str, Any], hparams: Dict[str, Any], backend: Any
) -> Optional[str]:
    """Local rank 0 of each machine runs download_data; the exchange below is everyone's barrier.

    Each rank contributes (host, outcome); an error anywhere ends every rank with that error, so no rank
    is left waiting for a download that will never come.
    """
    if model_def.download_data is None:
        return None
    outcome: Optional[Tuple[str, str]] = None
    if backend.local_rank == 0:
        try:
            path = _call_user(model_def.download_data, model_def, "download_data()", config_dict, hparams)
            if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
                raise HarnessError(f"download_data() returned {path!r}, which is not an existing directory")
            outcome = ("ok", os.path.abspath(path))
        except HarnessError as e:
            outcome = ("error", str(e))
    host = socket.gethostname()
    everyone = backend.allgather_object((host, outcome))
    for _, theirs in everyone:
        if theirs is not None and theirs[0] == "error":
            raise HarnessError(theirs[1])
    mine = [o for h, o in everyone if h == host and o is not None]
    if not mine:
        raise HarnessError(f"no rank with local rank 0 ran download_data() on {host}")
    return mine[0][1]
