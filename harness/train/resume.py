"""What a resumed run may change: the config against the checkpoint's, the model against its weights.

Training further, reporting, validating or checkpointing at other periods is fine (said in one line);
anything that would train a different model than the checkpoint's — hyperparameters, data, the trial class,
the seed, layer shapes — is refused with one line naming it, exit 2 (so `harness launch` does not retry).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from harness.config import parse_config
from harness.errors import HarnessError

# Dotted config keys (and their subkeys) that a resume may change.
MAY_CHANGE = (
    "description",
    "name",
    "labels",
    "searcher.max_length",
    "searcher.metric",
    "searcher.smaller_is_better",
    "batches_per_step",
    "min_validation_period",
    "min_checkpoint_period",
    "checkpoint_policy",
    "checkpoint_storage",
    "scheduling_unit",
    "max_restarts",
    # Speed, not what is trained.
    "optimizations.tensor_fusion_threshold",
    "optimizations.tensor_fusion_cycle_time",
    "optimizations.auto_tune_tensor_fusion",
    "optimizations.average_training_metrics",
    "optimizations.grad_updates_size_file",
    # Cluster settings the harness ignores anyway.
    "resources",
    "environment",
    "bind_mounts",
    "data_layer",
    "tensorboard_storage",
    "security",
    "internal",
    "debug",
    "profiling",
    "workspace",
    "project",
    "records_per_epoch",
)
_HINT = "start over with --fresh, or train into another --output"


def _flat(obj: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: Dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def check_config(saved: Dict[str, Any], now: Dict[str, Any], checkpoint_path: str) -> Optional[str]:
    """Raise if `now` (the effective config) trains differently from `saved` (the checkpoint's); else a
    line saying what changed, or None."""
    before, after = _flat(saved), _flat(now)
    if after.get("reproducibility.experiment_seed") is None:  # a drawn seed is kept from the checkpoint
        after["reproducibility.experiment_seed"] = before.get("reproducibility.experiment_seed")
    defaults = _flat(parse_config({}).as_dict())  # a key added since the checkpoint, at its default
    changed = sorted(
        k
        for k in set(before) | set(after)
        if before.get(k) != after.get(k) and not (k not in before and after.get(k) == defaults.get(k))
    )
    refused = [k for k in changed if not _may_change(k)]
    if refused:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise HarnessError(
            f"cannot resume from {checkpoint_path}: the config changed {shown}{more} since that "
            f"checkpoint, which would silently train something else; {_HINT}"
        )
    if not changed:
        return None
    return "resuming with a changed config: " + ", ".join(
        f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in changed
    )


def check_model(
    model: torch.nn.Module,
    saved: Dict[str, torch.Tensor],
    checkpoint_path: str,
    doing: str = "resume from",
    hint: str = _HINT,
) -> None:
    """The checkpoint's weights must fit the model that build_model() returned now (`doing` and `hint`
    word the error for other uses than a resume, e.g. `harness evaluate`)."""
    current = model.state_dict()
    problems: List[str] = []
    for name, tensor in current.items():
        if name not in saved:
            problems.append(f"the model has {name}, which the checkpoint lacks")
        elif tuple(saved[name].shape) != tuple(tensor.shape):
            problems.append(
                f"{name} has shape {tuple(tensor.shape)}, the checkpoint's {tuple(saved[name].shape)}"
            )
    problems += [f"the checkpoint has {n}, which the model lacks" for n in saved if n not in current]
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise HarnessError(
            f"cannot {doing} {checkpoint_path}: the model does not fit its weights: {problems[0]}{more}; "
            f"{hint}"
        )
