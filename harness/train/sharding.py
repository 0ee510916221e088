"""The user's loaders, rebuilt to shard the data across ranks (training: a resumable DistributedSampler;
validation: every record exactly once, no padding)."""

from __future__ import annotations

from typing import Any, Iterator, Tuple

import torch.utils.data as tud

from harness.errors import HarnessError


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
