"""The running `PyTorchTrialContext`: Determined's trial context, bound to this rank's backend and config.

A context trial calls ``context.backward(loss)`` and ``context.step_optimizer(opt)`` inside its
``train_batch``; each wrapped optimizer is an `OptimizerStep` (the harness's synchronize, unscale, average,
clip, step), so aggregation, clipping and fp16 behave as for the other APIs. What follows the batch is
harness/train/context_step.py.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from harness.api.context import MetricReducer, PyTorchTrialContext, check_step_mode
from harness.api.lr_scheduler import LRScheduler, StepMode
from harness.api.trial import hyperparameter
from harness.config import ExperimentConfig
from harness.config.optimizations import TrainingOptions
from harness.distributed.backend import Backend
from harness.errors import HarnessError
from harness.train.batches import to_device
from harness.train.optimizer_step import OptimizerStep


class Distributed:
    """``context.distributed``: this rank's place in the job."""

    def __init__(self, backend: Backend):
        self._b = backend

    def get_rank(self) -> int:
        return self._b.rank

    def get_size(self) -> int:
        return self._b.size

    def get_local_rank(self) -> int:
        return self._b.local_rank

    def get_local_size(self) -> int:
        return self._b.local_size

    def get_cross_rank(self) -> int:
        return self._b.cross_rank

    @property
    def rank(self) -> int:  # Core API's attributes, used by some trials too
        return self._b.rank

    @property
    def size(self) -> int:
        return self._b.size


class Context(PyTorchTrialContext):
    """The context a Determined-style trial is made with, bound to this rank's backend and the config."""

    def __init__(
        self,
        config: ExperimentConfig,
        backend: Backend,
        device: torch.device,
        options: TrainingOptions,
        seed: int,
    ):
        self.config, self.backend, self.device, self.options, self.seed = (
            config,
            backend,
            device,
            options,
            seed,
        )
        self.distributed = Distributed(backend)
        self.models: List[nn.Module] = []
        self.steps: List[OptimizerStep] = []  # one per wrapped optimizer, in wrap order
        self.schedulers: List[LRScheduler] = []
        self.reducers: Dict[str, Any] = {}  # name -> (reducer, for_training, for_validation)
        self.scaler = torch.amp.GradScaler(device.type) if options.precision == "fp16" else None
        self.window_ends = True  # whether the batch being trained ends an aggregation window
        self.callbacks: Dict[str, Any] = {}
        self._step_of: Dict[int, OptimizerStep] = {}  # id(wrapped optimizer) -> its step
        self._hooks: List[Any] = []  # callbacks with on_before_optimizer_step (set with the callbacks)
        self.experimental = _Experimental()
        self._frozen = False  # wrap_* only in __init__: set-up has taken what the trial wrapped

    # --- what __init__ wraps ----------------------------------------------------------------------------

    def _wrapping(self, what: str) -> None:
        if self._frozen:
            raise HarnessError(f"context.{what}() called after the trial's __init__; call it in __init__")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self._wrapping("wrap_model")
        if not isinstance(model, nn.Module):
            raise HarnessError(
                f"context.wrap_model() got a {type(model).__name__}; expected a torch.nn.Module"
            )
        model = model.to(self.device)
        self.models.append(model)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, backward_passes_per_step: int = 1) -> Any:
        self._wrapping("wrap_optimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise HarnessError(
                f"context.wrap_optimizer() got a {type(optimizer).__name__}; expected a torch.optim.Optimizer"
            )
        if not self.models:
            raise HarnessError(
                "context.wrap_optimizer() called before context.wrap_model(); wrap the model first"
            )
        if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int):
            raise HarnessError("context.wrap_optimizer(): backward_passes_per_step must be an integer >= 1")
        if backward_passes_per_step < 1:
            raise HarnessError("context.wrap_optimizer(): backward_passes_per_step must be an integer >= 1")
        named = nn.ModuleList(self.models)  # names unique across models: "0.fc.weight", "1.fc.weight"
        wrapped_ids = {id(p) for p in named.parameters()}
        if any(id(p) not in wrapped_ids for g in optimizer.param_groups for p in g["params"]):
            raise HarnessError(
                "context.wrap_optimizer(): the optimizer holds parameters of no model given to "
                "context.wrap_model(); build it from the wrapped model's parameters()"
            )
        wrapped = self.backend.wrap_optimizer(optimizer, named, self.options, backward_passes_per_step)
        step = OptimizerStep(wrapped, None, self.options, self.device, scaler=self.scaler)
        self.steps.append(step)
        self._step_of[id(wrapped)] = step
        return wrapped

    def wrap_lr_scheduler(self, lr_scheduler: Any, step_mode: StepMode, frequency: int = 1) -> Any:
        self._wrapping("wrap_lr_scheduler")
        wrapper = LRScheduler(lr_scheduler, check_step_mode(step_mode), frequency=frequency)
        self.schedulers.append(wrapper)
        return wrapper if step_mode is StepMode.MANUAL_STEP else lr_scheduler

    def wrap_reducer(
        self, reducer: Any, name: Optional[str] = None, for_training: bool = True, for_validation: bool = True
    ) -> Any:
        if not (isinstance(reducer, MetricReducer) or callable(reducer)):
            raise HarnessError(
                f"context.wrap_reducer() got a {type(reducer).__name__}; "
                "expected a MetricReducer or a function"
            )
        if name is None and not isinstance(reducer, MetricReducer):
            raise HarnessError("context.wrap_reducer(): a function reducer needs name=")
        name = name or type(reducer).__name__
        if name in self.reducers:
            raise HarnessError(f"context.wrap_reducer(): a reducer named '{name}' is already wrapped")
        if isinstance(reducer, MetricReducer):
            reducer.reset()
        else:
            reducer = _FunctionReducer(reducer)
        self.reducers[name] = (reducer, for_training, for_validation)
        return reducer

    def configure_apex_amp(self, models: Any, optimizers: Any, enabled: bool = True, opt_level: str = "O1",
                           **kwargs: Any) -> Any:  # fmt: skip
        """apex.amp mapped onto torch.amp: O1/O2 train in fp16 with a loss scaler, as the config's
        optimizations.mixed_precision would; other settings are refused by name."""
        if not enabled:
            return models, optimizers
        if opt_level not in ("O1", "O2") or kwargs:
            bad = f"opt_level={opt_level!r}" if opt_level not in ("O1", "O2") else ", ".join(kwargs)
            raise HarnessError(
                f"context.configure_apex_amp(): {bad} cannot be mapped onto torch.amp (the harness maps "
                "opt_level O1/O2 only); set optimizations.mixed_precision in the config instead"
            )
        if self.options.precision == "fp16":
            return models, optimizers  # the config asked for it already
        if self.device.type != "cuda":
            raise HarnessError(
                "context.configure_apex_amp(): fp16 with a loss scaler (apex's O1/O2, here torch.amp) is for "
                f"CUDA GPUs, and this rank trains on {self.device.type}; drop the call, or train on a GPU"
            )
        if not self.steps:
            raise HarnessError("context.configure_apex_amp() called before context.wrap_optimizer()")
        # torch.amp instead of apex: fp16 autocast for the forward passes, one GradScaler for every optimizer.
        self.options = dataclasses.replace(self.options, precision="fp16")
        self.scaler = torch.amp.GradScaler(self.device.type)
        for step in self.steps:
            step.options, step.scaler, step._own_scaler = self.options, self.scaler, False
        return models, optimizers

    # --- what train_batch calls -------------------------------------------------------------------------

    def backward(
        self, loss: torch.Tensor, gradient: Any = None, retain_graph: bool = False, create_graph: bool = False
    ) -> None:
        if not isinstance(loss, torch.Tensor):
            raise HarnessError(f"context.backward() got a {type(loss).__name__}; expected a tensor")
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward(gradient=gradient, retain_graph=retain_graph, create_graph=create_graph)

    def step_optimizer(
        self,
        optimizer: Any,
        clip_grads: Optional[Callable[[Iterator[Any]], None]] = None,
        auto_zero_grads: bool = True,
        scaler: Any = None,
    ) -> None:
        step = self._step_of.get(id(optimizer))
        if step is None:
            raise HarnessError(
                "context.step_optimizer() got an optimizer that context.wrap_optimizer() did not return; "
                "pass the wrapped one"
            )
        if scaler is not None:
            raise HarnessError(
                "context.step_optimizer(scaler=...): the harness owns the loss scaler; set "
                "optimizations.mixed_precision in the config instead of wrap_scaler()"
            )
        if self.options.aggregation_frequency > 1 and not auto_zero_grads:
            raise HarnessError(
                "context.step_optimizer(auto_zero_grads=False) with optimizations.aggregation_frequency "
                f"{self.options.aggregation_frequency}: gradients must be zeroed by the harness then"
            )
        if not self.window_ends:  # mid-window: the gradients accumulate
            return
        hooks = self._hooks
        if clip_grads is not None or hooks:

            def clip(params: List[torch.Tensor]) -> None:
                if clip_grads is not None:
                    clip_grads(iter(params))
                for c in hooks:
                    c.on_before_optimizer_step(iter(params))

            step.apply(clip, zero_grads=auto_zero_grads)
        else:
            step.apply(zero_grads=auto_zero_grads)

    def to_device(self, data: Any) -> Any:
        return to_device(data, self.device, "context.to_device() argument")

    # --- getters -------------------------------------------------------------------------------------

    def get_hparam(self, name: str) -> Any:
        # This context's own hyperparameters, not the module-global ones: two trials loaded in one
        # process (harness.load_trial) each answer for their own checkpoint.
        return hyperparameter(self.config.hyperparameters, name)

    def get_hparams(self) -> Dict[str, Any]:
        return dict(self.config.hyperparameters)

    def get_global_batch_size(self) -> int:
        value = self.config.hyperparameters.get("global_batch_size")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise HarnessError(
                "hyperparameter 'global_batch_size' "
                + ("is missing" if value is None else f"is {value!r}")
                + "; a Determined trial needs it as a positive integer"
            )
        return value

    def get_per_slot_batch_size(self) -> int:
        value, ranks = self.get_global_batch_size(), self.backend.size
        if value % ranks:
            raise HarnessError(
                f"the hyperparameter 'global_batch_size' is {value}, not divisible by the {ranks} ranks"
            )
        return value // ranks

    def get_data_config(self) -> Dict[str, Any]:
        return dict(self.config.data or {})

    def get_experiment_config(self) -> Dict[str, Any]:
        return self.config.as_dict()

    def get_trial_seed(self) -> int:
        return self.seed

    def get_trial_id(self) -> int:
        return 1

    def get_experiment_id(self) -> int:
        return 1

    def get_stop_requested(self) -> bool:
        return False

    def set_stop_requested(self, stop_requested: bool) -> None:
        raise HarnessError(
            "context.set_stop_requested() is not supported: the harness stops at searcher.max_length, on a "
            "signal or when the searcher says"
        )

    def get_enable_tensorboard_logging(self) -> bool:
        return True

    # --- the harness's side ---------------------------------------------------------------------------

    def set_callbacks(self, callbacks: Dict[str, Any]) -> None:
        self.callbacks = callbacks
        self._hooks = [c for c in callbacks.values() if _overrides(c, "on_before_optimizer_step")]

    def freeze(self, trial: Any = None) -> None:
        """The trial's __init__ is done: what it wrapped is what trains."""
        who = "the trial's __init__"
        if trial is not None:
            cls = type(trial)
            where = getattr(sys.modules.get(cls.__module__), "__file__", None) or cls.__module__
            who = f"{where}: {cls.__name__}.__init__"
        if not self.models:
            raise HarnessError(f"{who} wrapped no model: call context.wrap_model() on it")
        if not self.steps:
            raise HarnessError(f"{who} wrapped no optimizer: call context.wrap_optimizer() on it")
        self._frozen = True

    def model(self) -> nn.Module:
        """The one module that is broadcast, checkpointed and exported: the model, or all of them."""
        return self.models[0] if len(self.models) == 1 else nn.ModuleList(self.models)

    def _chosen(self, for_validation: bool) -> List[Any]:
        return [(n, r) for n, (r, t, v) in self.reducers.items() if (v if for_validation else t)]

    def gather_slots(self, for_validation: bool) -> Dict[str, List[Any]]:
        """Every rank's per_slot_reduce() of each reducer, in rank order (a collective)."""
        chosen = self._chosen(for_validation)
        if not chosen:
            return {}
        everyone = self.backend.allgather_object([r.per_slot_reduce() for _, r in chosen])
        return {name: [theirs[i] for theirs in everyone] for i, (name, _) in enumerate(chosen)}

    def reduce_metrics(
        self, for_validation: bool, carried: Optional[Dict[str, List[Any]]] = None
    ) -> Dict[str, Any]:
        """Every wrapped reducer's metric as plain numbers (a collective); `carried`: per-slot results of
        the same window from before a resume, reduced with this run's."""
        slots = self.gather_slots(for_validation)
        out: Dict[str, Any] = {}
        for name, reducer in self._chosen(for_validation):
            value = _numbers(reducer.cross_slot_reduce((carried or {}).get(name, []) + slots[name]))
            reducer.reset()
            if isinstance(value, dict):
                out.update(value)
            else:
                out[name] = value
        return out

    def reset_reducers(self, for_validation: bool) -> None:
        for reducer, t, v in self.reducers.values():
            if v if for_validation else t:
                reducer.reset()


def _numbers(value: Any) -> Any:
    """A reducer's result as plain numbers (tensors and ndarrays become floats or lists)."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numbers(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if hasattr(value, "tolist"):  # numpy
        return value.tolist()
    return value


class _Experimental:
    """``context.experimental``: the settings Determined kept there; the harness's behaviour already is."""

    def disable_dataset_reproducibility_checks(self) -> None:
        pass  # the harness rebuilds the loaders itself; nothing to check

    def disable_auto_to_device(self) -> None:
        raise HarnessError(
            "context.experimental.disable_auto_to_device() is not supported: batches go to the device"
        )

    def wrap_reducer(self, reducer: Any, name: Optional[str] = None) -> Any:
        raise HarnessError("context.experimental.wrap_reducer(): use context.wrap_reducer()")


class _FunctionReducer(MetricReducer):
    """A function of every value the trial gave (``reducer(list)``), Determined's simple form."""

    def __init__(self, fn: Callable[[List[Any]], Any]):
        self.fn = fn
        self.values: List[Any] = []

    def update(self, value: Any) -> None:
        self.values.append(value)

    def reset(self) -> None:
        self.values = []

    def per_slot_reduce(self) -> Any:
        return self.values

    def cross_slot_reduce(self, per_slot_metrics: List[Any]) -> Any:
        return self.fn([v for values in per_slot_metrics for v in values])


def _overrides(callback: Any, name: str) -> bool:
    from harness.api.context import PyTorchCallback

    return getattr(type(callback), name, None) is not getattr(PyTorchCallback, name)
