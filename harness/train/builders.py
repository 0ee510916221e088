"""The trial's own functions, each called once per run with the arguments its signature asks for, and its
result checked: an error in it is one line naming the function and the user's file and line (`call_user`)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from harness.api.context import InvalidHP
from harness.api.lr_scheduler import LRScheduler
from harness.api.trial import defines
from harness.definition import ModelDefinition, positional_arity, user_frame
from harness.errors import HarnessError, describe


def call_user(fn: Any, model_def: ModelDefinition, what: str, *args: Any) -> Any:
    """Call user code that runs once; name it in the error if it raises."""
    try:
        return fn(*args)
    except HarnessError:
        raise
    except Exception as e:  # noqa: BLE001
        where = user_frame(e.__traceback__, model_def.directory)
        raise HarnessError(f"{what} raised {describe(e)}" + (f" (at {where})" if where else "")) from e


def make_trial(model_def: ModelDefinition, hparams: Dict[str, Any], context: Any = None) -> Any:
    """The trial: ``cls(context)`` for Determined's API, ``cls(hparams)`` or ``cls()`` for PEDL's."""
    cls = model_def.trial_class
    if context is not None:
        try:
            return call_user(cls, model_def, f"{cls.__name__}(context)", context)
        except HarnessError as e:
            if isinstance(e.__cause__, InvalidHP):
                raise HarnessError(
                    f"{cls.__name__}(context) raised InvalidHP: {e.__cause__ or 'no message'}; the trial "
                    "ends as invalid"
                ) from e.__cause__
            raise
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
