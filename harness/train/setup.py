"""Set-up: from a model definition and a config to what the loop trains, on every rank, in one order.

Training (`build_training`) and evaluation (`start_trial`, then the validation loader and the model) share
it, so a checkpoint is evaluated with exactly the trial, context, seeding and sharding it was trained with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from harness.api import trial as trial_api
from harness.api.context import ContextTrial
from harness.api.trial import defines
from harness.config import ExperimentConfig, optimizations
from harness.config.optimizations import TrainingOptions
from harness.definition import ModelDefinition
from harness.distributed.backend import Backend
from harness.errors import HarnessError
from harness.train import builders
from harness.train.adapters import TrialAdapter, make_adapter
from harness.train.context import Context
from harness.train.context_adapter import ContextAdapter, build_loaders
from harness.train.data import make_loaders
from harness.train.optimizer_step import OptimizerStep
from harness.train.sharding import ResumableDistributedSampler, shard_training_loader


@dataclass
class TrialParts:
    """What training and evaluation both build first: the device, the trial and its adapter."""

    model_def: ModelDefinition
    trial: Any
    adapter: TrialAdapter
    device: torch.device
    options: TrainingOptions


def start_trial(
    model_def: ModelDefinition, config: ExperimentConfig, backend: Backend, seed: int
) -> TrialParts:
    """The trial object, made with the run's context set and every rank seeded alike (so that models built
    from it start equal)."""
    device = pick_device(backend)
    options = config.training_options
    trial_api._set_context(config.hyperparameters, None, config.as_dict(), seed)
    seed_everything(seed)
    context = None
    if model_def.prebuilt is not None:  # a Trainer script made them (harness/trainer.py)
        trial, context = model_def.prebuilt
        context.seed = seed
        adapter = make_adapter(trial, context)
        context.freeze(trial)
        return TrialParts(model_def, trial, adapter, context.device, options)
    if issubclass(model_def.trial_class, ContextTrial):  # Determined's: made with a context
        context = Context(config, backend, device, options, seed)
    trial = builders.make_trial(model_def, config.hyperparameters, context)
    adapter = make_adapter(trial, context)
    if isinstance(adapter, ContextAdapter):
        context.freeze(trial)  # type: ignore[union-attr]  # what __init__ wrapped is what trains
    return TrialParts(model_def, trial, adapter, device, options)


@dataclass
class Training:
    """Everything the loop trains with, built alike on every rank."""

    parts: TrialParts
    global_batch: int
    train_loader: Any
    sampler: ResumableDistributedSampler
    val_loader: Any  # sharded for the trial's API; None: training without validation
    model: torch.nn.Module
    optimizer: Any  # the backend's wrapper of the trial's optimizer
    step: Any  # OptimizerStep; ContextStep for Determined's context trials

    @property
    def per_rank_batch(self) -> int:
        return self.train_loader.batch_size


def build_training(
    model_def: ModelDefinition, config: ExperimentConfig, backend: Backend, seed: int, stop: Any = None
) -> Training:
    """Trial, batch size, data (downloaded once per machine, sharded), model, optimizer and its step."""
    parts = start_trial(model_def, config, backend, seed)
    optimizations.check_device(parts.options, parts.device)
    hparams = config.hyperparameters
    if model_def.make_data_loaders is None:  # Determined's trials build their own loaders
        train_loader, val_loader = build_loaders(
            parts.trial, lambda fn, what: builders.call_user(fn, model_def, what)
        )
        global_batch = context_global_batch(parts.trial, model_def, hparams, backend.size, train_loader)
    else:
        global_batch = builders.global_batch_size(parts.trial, model_def, hparams, backend.size)
        train_loader, val_loader = make_loaders(
            model_def, config.as_dict(), hparams, backend, config.download_timeout, stop
        )
    train_loader, sampler = shard_training_loader(
        train_loader, global_batch // backend.size, backend.rank, backend.size, seed
    )
    if val_loader is not None:  # None: no validation at all
        val_loader = parts.adapter.validation_loader(val_loader, backend.rank, backend.size)
    elif config.searcher.metric:
        raise HarnessError(
            f"config key 'searcher.metric' names '{config.searcher.metric}', but make_data_loaders() "
            "returned no validation loader (None); remove searcher.metric or return one"
        )
    adapter = parts.adapter
    if isinstance(adapter, ContextAdapter):  # the trial's __init__ wrapped its models and optimizers
        context_step = adapter.start(len(train_loader))
        model = adapter.context.model()
        return Training(
            parts,
            global_batch,
            train_loader,
            sampler,
            val_loader,
            model,
            context_step.optimizer,
            context_step,
        )
    # Built on every rank from the same seed; rank 0's state is broadcast (after a resume restored it).
    model = builders.build_model(parts.trial, model_def, hparams).to(parts.device)
    optimizer = backend.wrap_optimizer(
        builders.build_optimizer(parts.trial, model_def, model, hparams), model, parts.options
    )
    scheduler = builders.build_lr_scheduler(parts.trial, model_def, optimizer)
    step = OptimizerStep(optimizer, scheduler, parts.options, parts.device, no_sync=backend.no_sync)
    return Training(parts, global_batch, train_loader, sampler, val_loader, model, optimizer, step)


def context_global_batch(
    trial: Any, model_def: ModelDefinition, hparams: Dict[str, Any], ranks: int, train_loader: Any
) -> int:
    """A Determined trial's global batch: the hyperparameter global_batch_size, else (Trainer scripts
    may leave it out) the training loader's batch size on every rank."""
    if "global_batch_size" in hparams or defines(type(trial), "batch_size"):
        return builders.global_batch_size(trial, model_def, hparams, ranks)
    per_rank = getattr(train_loader, "batch_size", None)
    if isinstance(per_rank, bool) or not isinstance(per_rank, int) or per_rank <= 0:
        raise HarnessError(
            "no global batch size: set the hyperparameter global_batch_size, or give the training loader "
            "a batch_size"
        )
    return per_rank * ranks


def trial_model(parts: TrialParts, hparams: Dict[str, Any]) -> torch.nn.Module:
    """The trial's model as training checkpoints it: built by build_model(), or what the trial's
    __init__ wrapped (several models: one ModuleList)."""
    if isinstance(parts.adapter, ContextAdapter):
        return parts.adapter.context.model()
    return builders.build_model(parts.trial, parts.model_def, hparams)


def trial_validation_loader(parts: TrialParts, config: ExperimentConfig, backend: Backend) -> Any:
    """The unsharded validation loader: the trial's own, or make_data_loaders()'s after download_data()."""
    model_def = parts.model_def
    if model_def.make_data_loaders is None:
        return builders.call_user(
            parts.trial.build_validation_data_loader, model_def, "build_validation_data_loader()"
        )
    _, val_loader = make_loaders(
        model_def, config.as_dict(), config.hyperparameters, backend, config.download_timeout
    )
    return val_loader


def pick_device(backend: Backend) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(backend.local_rank)
        return torch.device("cuda", backend.local_rank)
    return torch.device("cpu")


def agree_on_seed(config_seed: Optional[int], backend: Backend, resumed: Optional[Dict[str, Any]]) -> int:
    seed = config_seed
    if seed is None and resumed:
        seed = resumed["seed"]  # a drawn seed is kept across restarts
    if seed is None:
        drawn = random.SystemRandom().randrange(2**31) if backend.rank == 0 else None
        seed = backend.broadcast_object(drawn)
    assert seed is not None, "rank 0 drew it"
    return seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
