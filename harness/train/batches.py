"""Batches on their way to the model: ndarrays to tensors, onto the rank's device, structure kept, with
errors that name the path inside the batch (`batch[0]['pixels']`)."""

from __future__ import annotations

import sys
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from harness.errors import HarnessError, say


def to_device(obj: Any, device: torch.device, path: str, non_blocking: bool = False) -> Any:
    """Convert ndarrays to tensors and move every tensor to `device`, keeping the nesting.

    `path` names the object in error messages, e.g. ``training batch 3 input['image'][0]``.
    """
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise HarnessError(
                f"{path} is an ndarray of dtype {obj.dtype}; only numeric arrays can become tensors"
            )
        t = torch.from_numpy(obj)
        return t if device.type == "cpu" else t.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, f"{path}[{k!r}]", non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_device(v, device, f"{path}[{i}]", non_blocking) for i, v in enumerate(obj)]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        return type(obj)(items) if isinstance(obj, tuple) else items
    raise HarnessError(
        f"{path} is a {type(obj).__name__}; batches may hold only ndarrays, tensors, "
        "and tuples, lists or dicts of them"
    )


def batch_to_device(
    batch: Any, device: torch.device, where: str, non_blocking: bool = False
) -> Tuple[Any, Any]:
    """A batch as (input, target) on `device`; `where` (e.g. "training batch 3") names it in errors."""
    if type(batch) in (tuple, list) and len(batch) == 2:
        inputs, labels = batch
        if (
            type(inputs) is torch.Tensor
            and type(labels) is torch.Tensor
            and inputs.device == device
            and labels.device == device
        ):
            return inputs, labels  # the common case: nothing to check or convert
    inputs, labels = split_batch(batch, where)
    return (
        to_device(inputs, device, f"{where} input", non_blocking),
        to_device(labels, device, f"{where} target", non_blocking),
    )


def split_batch(batch: Any, where: str) -> Tuple[Any, Any]:
    """A batch must be a pair (input, target)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        shape = f"a {type(batch).__name__}" + (
            f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        )
        raise HarnessError(f"{where} is {shape}; expected a pair (input, target)")
    return batch[0], batch[1]


def first_tensor(obj: Any) -> Optional[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return obj
    values: List[Any] = (
        list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple)) else []
    )
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def leading_sizes(obj: Any, path: str = "") -> List[Tuple[str, int]]:
    """(path inside `obj`, first dimension) of every tensor in it with at least one dimension, in order."""
    if isinstance(obj, torch.Tensor):
        return [(path, int(obj.shape[0]))] if obj.dim() > 0 else []
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in leading_sizes(v, f"{path}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [s for i, v in enumerate(obj) for s in leading_sizes(v, f"{path}[{i}]")]
    return []


def disagreement(obj: Any, where: str, counted: int) -> Optional[str]:
    """One line if the tensors in `obj` (`where`: e.g. "training batch 3 input") disagree on their first
    dimension, naming them and their sizes (the first six), else None."""
    sizes = leading_sizes(obj)
    if all(n == counted for _, n in sizes):
        return None
    shown = ", ".join(f"{where}{p} {n}" for p, n in sizes[:6]) + (" ..." if len(sizes) > 6 else "")
    return (
        f"the tensors of {where} disagree on their first dimension ({shown}); the harness counts "
        f"{counted} records per such batch, the first tensor's (records weight validation metrics and "
        "count toward epochs): put the records along the first dimension of the first tensor"
    )


_warned_disagreement = False  # said once per process: a loader makes every batch alike


def _warn_once(line: str) -> None:
    global _warned_disagreement
    if _warned_disagreement:
        return
    _warned_disagreement = True
    from harness.distributed import env_rank

    if env_rank() == 0:  # every rank sees the same batches' shape: say it once
        say(f"harness: warning: {line}", sys.stderr)


def count_records(obj: Any, where: str) -> Optional[int]:
    """The first dimension of the first tensor in `obj` (None if there is none, or it has no dimension);
    tensors that disagree with it are said once (`disagreement`)."""
    t = first_tensor(obj)
    if t is None or t.dim() == 0:
        return None
    counted = int(t.shape[0])
    if not isinstance(obj, torch.Tensor) and not _warned_disagreement:
        line = disagreement(obj, where, counted)
        if line:
            _warn_once(line)
    return counted


def batch_records(inputs: Any, labels: Any, where: str) -> int:
    """The number of records in a batch: the first dimension of the first tensor of the target (else of the
    input); tensors of that part that disagree with it are said once, in one warning line."""
    if type(labels) is torch.Tensor and labels.dim() > 0:
        return labels.shape[0]  # the common case, checked first
    n = count_records(labels, f"{where} target")
    if n is None:
        n = count_records(inputs, f"{where} input")
    if n is None:
        raise HarnessError(f"{where} holds no tensor with a batch dimension")
    return n
