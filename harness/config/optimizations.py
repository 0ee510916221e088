"""Training options: the `optimizations:` config block and the PEDL hyperparameters that set the same things.

PEDL read gradient clipping, aggregation, compression and `amp` from the hyperparameters; Determined moved
them into `optimizations:` (0.12.3). Both spellings are accepted; one option given both ways with different
values is an error naming both keys. `resolve` turns them into one `TrainingOptions`, which the optimizer
step (optimizer_step.py) applies; `horovod_environment` passes the tuning keys to Horovod before its init.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ContextManager, Dict, List, MutableMapping, Optional

from harness.errors import HarnessError

if TYPE_CHECKING:  # torch is imported where it is used: `harness launch` and config checks need none
    import torch

PRECISIONS = ("O0", "O1", "O2", "O3", "fp16", "bf16")
FP16 = ("O1", "O2", "fp16")  # autocast to float16 with a GradScaler (torch.amp has no separate O2)
_O3 = (
    "'O3' (apex's pure fp16 weights without fp32 master weights or loss scaling) cannot be honoured with "
    "torch.amp; use O1 (fp16 autocast with a loss scaler) or bf16"
)


@dataclass
class OptimizationsConfig:
    """The `optimizations:` block (Determined's keys, plus clipping and `bf16`/`fp16`). None: not given."""

    aggregation_frequency: Optional[int] = None  # optimizer step every k batches (default 1)
    average_aggregated_gradients: Optional[bool] = None  # divide the k batches' sum by k (default true)
    average_training_metrics: Optional[bool] = None  # always true here: metrics are over all ranks
    gradient_compression: Optional[bool] = None  # fp16 allreduce (default false)
    mixed_precision: Optional[str] = None  # O0 | O1 | O2 | fp16 | bf16 (O3 refused)
    clip_grad_l2_norm: Optional[float] = None
    clip_grad_val: Optional[float] = None
    tensor_fusion_threshold: Optional[float] = None  # MB; None: Horovod's default or your environment
    tensor_fusion_cycle_time: Optional[float] = None  # ms
    auto_tune_tensor_fusion: Optional[bool] = None
    grad_updates_size_file: Optional[str] = None  # Determined's profiling output: ignored


DEFAULTS = {
    "aggregation_frequency": 1,
    "average_aggregated_gradients": True,
    "average_training_metrics": True,
    "gradient_compression": False,
    "mixed_precision": "O0",
}
# PEDL hyperparameter -> optimizations key.
HPARAM_NAMES = {
    "aggregation_frequency": "aggregation_frequency",
    "gradient_compression": "gradient_compression",
    "clip_grad_l2_norm": "clip_grad_l2_norm",
    "clip_grad_val": "clip_grad_val",
    "amp": "mixed_precision",
}
_TUNING_ENV = {  # optimizations key -> (Horovod variable, value from the config's value)
    "tensor_fusion_threshold": ("HOROVOD_FUSION_THRESHOLD", lambda mb: str(int(mb * 1024 * 1024))),
    "tensor_fusion_cycle_time": ("HOROVOD_CYCLE_TIME", lambda ms: f"{ms:g}"),
    "auto_tune_tensor_fusion": ("HOROVOD_AUTOTUNE", lambda on: "1" if on else "0"),
}


@dataclass(frozen=True)
class TrainingOptions:
    """The effective training options (what OptimizerStep applies)."""

    aggregation_frequency: int = 1
    average_aggregated_gradients: bool = True
    gradient_compression: bool = False
    precision: str = "fp32"  # fp32 | fp16 | bf16
    clip_grad_l2_norm: Optional[float] = None
    clip_grad_val: Optional[float] = None

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)

    def autocast(self, device_type: str) -> ContextManager[Any]:
        """The context of forward passes (training's and validation's): autocast, or nothing under fp32."""
        import torch

        dtype = self.autocast_dtype
        return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()

    def describe(self) -> str:
        """`aggregation 4, bf16 autocast, clip L2 1.0` for the run's first line ('' when all are off)."""
        parts = []
        if self.aggregation_frequency > 1:
            avg = "" if self.average_aggregated_gradients else " (summed)"
            parts.append(f"aggregation {self.aggregation_frequency}{avg}")
        if self.precision != "fp32":
            parts.append(
                f"{self.precision} autocast" + (" with a loss scaler" if self.precision == "fp16" else "")
            )
        if self.clip_grad_l2_norm is not None:
            parts.append(f"clip L2 norm {self.clip_grad_l2_norm:g}")
        if self.clip_grad_val is not None:
            parts.append(f"clip value {self.clip_grad_val:g}")
        if self.gradient_compression:
            parts.append("fp16 gradient compression")
        return ", ".join(parts)


def _precision(value: Any, key: str) -> str:
    if isinstance(value, bool):  # PEDL's `amp: true`
        return "O1" if value else "O0"
    if value not in PRECISIONS:
        raise HarnessError(f"config key '{key}': expected one of {', '.join(PRECISIONS)}, got {value!r}")
    if value == "O3":
        raise HarnessError(f"config key '{key}': {_O3}")
    return str(value)


_BOOLEANS = (
    "average_aggregated_gradients",
    "average_training_metrics",
    "gradient_compression",
    "auto_tune_tensor_fusion",
)


def _check(name: str, value: Any, key: str) -> Any:
    """Validate one option's value (from either spelling); `key` names where it came from."""
    if value is None:
        return None
    if name == "mixed_precision":
        return _precision(value, key)
    if name in _BOOLEANS:
        if not isinstance(value, bool):
            raise HarnessError(f"config key '{key}': expected true or false, got {value!r}")
    elif name == "aggregation_frequency":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HarnessError(f"config key '{key}': expected an integer >= 1, got {value!r}")
    elif name == "grad_updates_size_file":
        if not isinstance(value, str):
            raise HarnessError(f"config key '{key}': expected a string, got {value!r}")
    else:  # clip values and tuning numbers
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise HarnessError(f"config key '{key}': expected a number, got {value!r}")
        if name.startswith("clip_") and value <= 0:
            raise HarnessError(f"config key '{key}': expected a positive number, got {value!r}")
        if value < 0:
            raise HarnessError(f"config key '{key}': expected a number >= 0, got {value!r}")
        value = float(value)
    return value


def merge(block: OptimizationsConfig, hparams: Dict[str, Any]) -> OptimizationsConfig:
    """The block with the PEDL hyperparameters folded in (validated; a disagreement is an error)."""
    merged: Dict[str, Any] = {}
    for f in fields(OptimizationsConfig):
        merged[f.name] = _check(f.name, getattr(block, f.name), f"optimizations.{f.name}")
    for hname, name in HPARAM_NAMES.items():
        if hname not in hparams:
            continue
        value = _check(name, hparams[hname], f"hyperparameters.{hname}")
        given = merged[name]
        if given is not None and given != value and not _same_precision(name, given, value):
            raise HarnessError(
                f"config keys 'hyperparameters.{hname}' ({hparams[hname]!r}) and 'optimizations.{name}' "
                f"({getattr(block, name)!r}) set the same option differently; keep one"
            )
        merged[name] = value if given is None else given
    if merged["clip_grad_l2_norm"] is not None and merged["clip_grad_val"] is not None:
        raise HarnessError(
            "config sets both clip_grad_l2_norm and clip_grad_val; keep one (as PEDL required)"
        )
    for name, default in DEFAULTS.items():  # Determined's defaults, so that user code reading them sees them
        if merged[name] is None:
            merged[name] = default
    return OptimizationsConfig(**merged)


def defaults() -> OptimizationsConfig:
    """The block when a config has none (Determined's defaults filled in)."""
    return merge(OptimizationsConfig(), {})


def _same_precision(name: str, a: Any, b: Any) -> bool:
    """O1, O2 and fp16 all mean fp16 autocast with a scaler here: not a disagreement."""
    return name == "mixed_precision" and _kind(a) == _kind(b)


def _kind(precision: Optional[str]) -> str:
    if precision in FP16:
        return "fp16"
    return "bf16" if precision == "bf16" else "fp32"


def training_options(opt: OptimizationsConfig) -> TrainingOptions:
    return TrainingOptions(
        aggregation_frequency=opt.aggregation_frequency or 1,  # (None only before merge)
        average_aggregated_gradients=opt.average_aggregated_gradients is not False,
        gradient_compression=bool(opt.gradient_compression),
        precision=_kind(opt.mixed_precision),
        clip_grad_l2_norm=opt.clip_grad_l2_norm,
        clip_grad_val=opt.clip_grad_val,
    )


def notes(opt: OptimizationsConfig) -> List[str]:
    """Warnings about options that are accepted but change nothing here."""
    out = []
    if opt.average_training_metrics is False:
        out.append(
            "optimizations.average_training_metrics: false is ignored: training metrics are always "
            "averaged over all ranks here"
        )
    if opt.grad_updates_size_file is not None:
        out.append("optimizations.grad_updates_size_file is ignored (a Determined profiling output)")
    return out


def check_device(options: TrainingOptions, device: torch.device) -> None:
    """fp16 with a loss scaler is offered on CUDA only (as Determined did): refuse it elsewhere."""
    if options.precision == "fp16" and device.type != "cuda":
        raise HarnessError(
            f"config key 'optimizations.mixed_precision' (or hyperparameter 'amp'): fp16 autocast with a "
            f"loss scaler is for CUDA GPUs, and this rank trains on {device.type} (where fp16 is slower than "
            "fp32); use mixed_precision: bf16 there, or O0"
        )


def horovod_environment(opt: OptimizationsConfig, env: MutableMapping[str, str]) -> List[str]:
    """Set Horovod's tuning variables from the config in `env` (before hvd.init()); the user's own
    HOROVOD_* variables win. Returns a line for each conflict."""
    conflicts = []
    for name, (var, fmt) in _TUNING_ENV.items():
        value = getattr(opt, name)
        if value is None:
            continue
        wanted = fmt(value)
        if var in env:
            if env[var] != wanted:
                conflicts.append(
                    f"optimizations.{name} ({value!r}) sets {var}={wanted}, but the environment has "
                    f"{var}={env[var]}; the environment wins"
                )
            continue
        env[var] = wanted
    return conflicts


def apply_to_horovod(opt: OptimizationsConfig) -> List[str]:
    return horovod_environment(opt, os.environ)
