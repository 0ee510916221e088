"""Data loading: the DataLoader drop-in, sharding across ranks, and batch conversion to the device."""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.utils.data as tud

from harness.errors import HarnessError


class DataLoader(tud.DataLoader):
    """A drop-in replacement for ``torch.utils.data.DataLoader`` (same arguments).

    The harness rebuilds every loader that ``make_data_loaders`` returns around its dataset, collate_fn,
    workers etc., with a sampler that shards the data across ranks, shuffled if the loader shuffles
    (``shuffle=True`` or a RandomSampler). A plain torch DataLoader works the same way.
    """


class ShardSampler(tud.Sampler):
    """Validation sharding with no padding: rank r takes records r, r+size, ... exactly once."""

    def __init__(self, length: int, rank: int, size: int):
        self.indices = range(rank, length, size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableDistributedSampler(tud.DistributedSampler):
    """DistributedSampler that can start mid-epoch: `skip` records of this rank's shard are left out.

    The permutation is a function of (seed, epoch) only, so skipping the first k batches of an epoch
    yields exactly the batches an uninterrupted run would have trained next.
    """

    skip: int = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def _loader_kwargs(loader: tud.DataLoader) -> dict:
    """The user's loader settings that carry over to the rebuilt loader."""
    kw = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kw["prefetch_factor"] = loader.prefetch_factor
    return kw


def _check_loader(loader: Any, which: str) -> tud.DataLoader:
    if not isinstance(loader, tud.DataLoader):
        raise HarnessError(
            f"make_data_loaders() returned a {type(loader).__name__} as the {which} loader; "
            "expected a harness.DataLoader or torch.utils.data.DataLoader"
        )
    if isinstance(loader.dataset, tud.IterableDataset):
        raise HarnessError(
            f"the {which} loader wraps an IterableDataset, which cannot be sharded across ranks"
        )
    sampler = loader.sampler
    if not isinstance(sampler, (tud.SequentialSampler, tud.RandomSampler)):
        raise HarnessError(
            f"the {which} loader has a custom sampler ({type(sampler).__name__}); "
            "the harness shards the data itself, remove the sampler"
        )
    if loader.batch_size is None:
        batch_sampler = loader.batch_sampler
        how = (
            f"a custom batch_sampler ({type(batch_sampler).__name__})"
            if batch_sampler is not None
            else "batch_size=None (unbatched)"
        )
        raise HarnessError(
            f"the {which} loader has {how}: the harness shards the records across ranks and batches each "
            "rank's share itself (the global batch from batch_size() or the hyperparameters, split over "
            f"the ranks), so it cannot keep batches that the loader makes; return DataLoader(dataset, "
            "batch_size=N) without batch_sampler (shuffle=True for a shuffled training set), and put what "
            "the sampler did per record into the dataset or per batch into collate_fn"
        )
    return loader


def shard_training_loader(
    loader: Any, per_rank_batch: int, rank: int, size: int, seed: int
) -> Tuple[tud.DataLoader, ResumableDistributedSampler]:
    """Rebuild the training loader with a DistributedSampler and the per-rank batch size."""
    loader = _check_loader(loader, "training")
    if len(loader.dataset) < per_rank_batch * size:
        raise HarnessError(
            f"the training set has {len(loader.dataset)} records, fewer than one global batch of "
            f"{per_rank_batch * size}; lower the batch size"
        )
    shuffle = isinstance(loader.sampler, tud.RandomSampler)
    sampler = ResumableDistributedSampler(
        loader.dataset, num_replicas=size, rank=rank, shuffle=shuffle, seed=seed
    )
    rebuilt = tud.DataLoader(
        loader.dataset,
        batch_size=per_rank_batch,
        sampler=sampler,
        drop_last=loader.drop_last,
        **_loader_kwargs(loader),
    )
    return rebuilt, sampler


def shard_validation_loader(loader: Any, rank: int, size: int) -> tud.DataLoader:
    """Rebuild the validation loader so that every record is evaluated exactly once across ranks."""
    loader = _check_loader(loader, "validation")
    n = len(loader.dataset)
    if n < size:
        raise HarnessError(
            f"the validation set has {n} records, fewer than the {size} ranks (to train without "
            "validation, return None as the validation loader)"
        )
    return tud.DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(n, rank, size),
        drop_last=False,
        **_loader_kwargs(loader),
    )


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


def batch_records(inputs: Any, labels: Any, where: str) -> int:
    """The number of records in a batch: the first dimension of its first tensor."""
    if type(labels) is torch.Tensor and labels.dim() > 0:
        return labels.shape[0]  # the common case, checked first
    t = first_tensor(labels)
    if t is None or t.dim() == 0:
        t = first_tensor(inputs)
    if t is None or t.dim() == 0:
        raise HarnessError(f"{where} holds no tensor with a batch dimension")
    return int(t.shape[0])
