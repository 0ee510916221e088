"""Unit tests for harness.data: batch conversion, batch checks, and sharding loaders across ranks."""

import collections

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import harness
from harness.errors import HarnessError
from harness.train.batches import batch_records, batch_to_device, split_batch, to_device
from harness.train.sharding import ShardSampler, shard_training_loader, shard_validation_loader

CPU = torch.device("cpu")
Pair = collections.namedtuple("Pair", ["image", "mask"])


class IndexDataset(tud.Dataset):
    """Record i is the integer i, so a loader's output tells which records it yielded."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class Stream(tud.IterableDataset):
    def __iter__(self):
        return iter(range(10))


def indices(loader):
    return [int(i) for batch in loader for i in batch]


# to_device


def test_to_device_converts_ndarray_to_tensor():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = to_device(a, CPU, "input")
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float32
    assert t.shape == (2, 3)
    assert np.array_equal(t.numpy(), a)


@pytest.mark.parametrize(
    "dtype", [np.bool_, np.int8, np.uint8, np.int64, np.float16, np.float64, np.complex64]
)
def test_to_device_accepts_numeric_dtypes(dtype):
    a = np.ones(3, dtype=dtype)
    t = to_device(a, CPU, "input")
    assert isinstance(t, torch.Tensor)
    assert np.array_equal(t.numpy(), a)


def test_to_device_keeps_a_cpu_tensor():
    t = torch.arange(4)
    assert to_device(t, CPU, "input") is t


def test_batch_to_device_passes_a_tensor_pair_through():
    x, y = torch.zeros(4, 2), torch.arange(4)
    inputs, labels = batch_to_device([x, y], CPU, "training batch 1")
    assert inputs is x and labels is y
    inputs, labels = batch_to_device((np.zeros(2), {"k": y}), CPU, "training batch 1")
    assert isinstance(inputs, torch.Tensor) and labels["k"] is y
    with pytest.raises(HarnessError, match="training batch 7 target is a str"):
        batch_to_device((x, "oops"), CPU, "training batch 7")
    with pytest.raises(HarnessError, match="training batch 7 is a tuple of length 3"):
        batch_to_device((x, y, y), CPU, "training batch 7")


def test_to_device_keeps_nested_structure():
    batch = {
        "a": [np.zeros(2), torch.ones(3)],
        "b": (np.ones((2, 2), dtype=np.int64), {"c": np.full(1, 7.0)}),
        "p": Pair(np.zeros(1), torch.zeros(2)),
    }
    out = to_device(batch, CPU, "input")
    assert isinstance(out, dict)
    assert list(out) == ["a", "b", "p"]
    assert isinstance(out["a"], list) and len(out["a"]) == 2
    assert all(isinstance(x, torch.Tensor) for x in out["a"])
    assert type(out["b"]) is tuple and len(out["b"]) == 2
    assert isinstance(out["b"][0], torch.Tensor) and out["b"][0].dtype == torch.int64
    assert isinstance(out["b"][1], dict) and out["b"][1]["c"].tolist() == [7.0]
    assert type(out["p"]) is Pair
    assert isinstance(out["p"].image, torch.Tensor) and isinstance(out["p"].mask, torch.Tensor)
    assert out["p"].mask.shape == (2,)


def test_to_device_moves_tensors_and_arrays_to_the_device():
    meta = torch.device("meta")  # a non-CPU device that exists on every machine
    out = to_device({"x": torch.zeros(2), "y": [np.zeros(3)]}, meta, "input")
    assert out["x"].device.type == "meta"
    assert out["y"][0].device.type == "meta"
    assert out["y"][0].shape == (3,)


def test_to_device_names_the_path_of_a_str():
    with pytest.raises(HarnessError) as e:
        to_device({"a": [np.zeros(2), "oops"]}, CPU, "input")
    msg = str(e.value)
    assert "input['a'][1]" in msg
    assert "str" in msg


def test_to_device_names_the_path_inside_a_namedtuple():
    with pytest.raises(HarnessError, match=r"target\[0\]\[1\] is a NoneType"):
        to_device([Pair(np.zeros(1), None)], CPU, "target")


@pytest.mark.parametrize("bad", [np.array([1, "a"], dtype=object), np.array(["a", "b"])])
def test_to_device_rejects_non_numeric_ndarray(bad):
    with pytest.raises(HarnessError) as e:
        to_device((np.zeros(1), bad), CPU, "input")
    msg = str(e.value)
    assert "input[1]" in msg
    assert str(bad.dtype) in msg


# split_batch and batch_records


@pytest.mark.parametrize("pair", [(1, 2), [1, 2]])
def test_split_batch_accepts_pairs(pair):
    assert split_batch(pair, "batch 0") == (1, 2)


@pytest.mark.parametrize(
    "batch,shape",
    [
        ((1, 2, 3), "a tuple of length 3"),
        ([1], "a list of length 1"),
        ({"x": 1, "y": 2}, "a dict"),
        (torch.zeros(2, 3), "a Tensor"),
        (None, "a NoneType"),
    ],
)
def test_split_batch_rejects_non_pairs(batch, shape):
    with pytest.raises(HarnessError) as e:
        split_batch(batch, "training batch 4")
    msg = str(e.value)
    assert msg.startswith(f"training batch 4 is {shape}")
    assert "pair" in msg


def test_batch_records_uses_first_tensor_first_dim():
    inputs = {"x": (torch.zeros(6, 2), torch.zeros(3)), "y": torch.zeros(9)}
    assert batch_records(inputs, None, "b") == 6
    assert batch_records([[], [torch.zeros(5, 1)], torch.zeros(2)], None, "b") == 5


def test_batch_records_prefers_labels_then_falls_back_to_inputs():
    assert batch_records(torch.zeros(4, 3), torch.zeros(4), "b") == 4
    assert batch_records(torch.zeros(7, 3), {"t": torch.zeros(7, 2)}, "b") == 7
    # A 0-dim label carries no batch dimension: the inputs' first tensor counts.
    assert batch_records({"x": torch.zeros(5, 2)}, torch.tensor(1.0), "b") == 5


def test_batch_records_without_batch_dimension_is_an_error():
    with pytest.raises(HarnessError, match="validation batch 2"):
        batch_records({"x": torch.tensor(1.0)}, torch.tensor(0), "validation batch 2")
    with pytest.raises(HarnessError):
        batch_records([], {}, "b")


# shard_training_loader


def test_training_loader_gets_per_rank_batch_size():
    loader = harness.DataLoader(IndexDataset(20), batch_size=8)
    rebuilt, sampler = shard_training_loader(loader, 4, rank=1, size=2, seed=0)
    assert rebuilt.batch_size == 4
    assert isinstance(sampler, tud.DistributedSampler)
    assert rebuilt.sampler is sampler
    assert sampler.num_replicas == 2 and sampler.rank == 1
    sizes = [len(b) for b in rebuilt]
    assert sizes == [4, 4, 2]  # 10 records on this rank in batches of 4
    assert len(rebuilt) == 3


def test_training_loader_keeps_drop_last():
    loader = tud.DataLoader(IndexDataset(20), batch_size=8, drop_last=True)
    rebuilt, _ = shard_training_loader(loader, 4, rank=0, size=2, seed=0)
    assert rebuilt.drop_last is True
    assert [len(b) for b in rebuilt] == [4, 4]


@pytest.mark.parametrize(
    "make,shuffled",
    [
        (lambda ds: harness.DataLoader(ds, batch_size=4, shuffle=True), True),
        (lambda ds: tud.DataLoader(ds, batch_size=4, shuffle=True), True),
        (lambda ds: harness.DataLoader(ds, batch_size=4, shuffle=False), False),
        (lambda ds: tud.DataLoader(ds, batch_size=4, shuffle=False), False),
        (lambda ds: harness.DataLoader(ds, batch_size=4), False),
        (lambda ds: harness.DataLoader(ds, batch_size=4, sampler=tud.RandomSampler(ds)), True),
        (lambda ds: tud.DataLoader(ds, batch_size=4, sampler=tud.RandomSampler(ds)), True),
        (lambda ds: tud.DataLoader(ds, batch_size=4), False),
    ],
)
def test_training_loader_follows_user_shuffle(make, shuffled):
    n = 40
    rebuilt, sampler = shard_training_loader(make(IndexDataset(n)), 4, rank=0, size=1, seed=3)
    assert sampler.shuffle is shuffled
    order = indices(rebuilt)
    assert sorted(order) == list(range(n))
    if shuffled:
        assert order != list(range(n))
    else:
        assert order == list(range(n))


def test_unshuffled_training_shards_interleave():
    loader = harness.DataLoader(IndexDataset(10), batch_size=2)
    shards = [indices(shard_training_loader(loader, 2, rank=r, size=2, seed=0)[0]) for r in range(2)]
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


@pytest.mark.parametrize("shuffle", [True, False])
def test_training_shards_of_two_ranks_cover_every_index_once(shuffle):
    n = 30
    loader = harness.DataLoader(IndexDataset(n), batch_size=4, shuffle=shuffle)
    shards = [indices(shard_training_loader(loader, 3, rank=r, size=2, seed=11)[0]) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == n // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(n))


def test_set_epoch_changes_the_order():
    n = 32
    loader = harness.DataLoader(IndexDataset(n), batch_size=4, shuffle=True)
    rebuilt, sampler = shard_training_loader(loader, 4, rank=0, size=2, seed=5)
    sampler.set_epoch(0)
    epoch0 = indices(rebuilt)
    assert indices(rebuilt) == epoch0  # same epoch, same order
    sampler.set_epoch(1)
    epoch1 = indices(rebuilt)
    assert epoch1 != epoch0
    assert len(epoch1) == n // 2

    # Across both ranks, epoch 1 is still a partition of the data set.
    other, other_sampler = shard_training_loader(loader, 4, rank=1, size=2, seed=5)
    other_sampler.set_epoch(1)
    assert sorted(epoch1 + indices(other)) == list(range(n))


def test_training_seed_changes_the_order():
    loader = harness.DataLoader(IndexDataset(32), batch_size=4, shuffle=True)
    a = indices(shard_training_loader(loader, 4, rank=0, size=1, seed=1)[0])
    b = indices(shard_training_loader(loader, 4, rank=0, size=1, seed=2)[0])
    assert sorted(a) == sorted(b) == list(range(32))
    assert a != b


def test_training_loader_with_no_batch_per_rank_is_an_error():
    loader = tud.DataLoader(IndexDataset(4), batch_size=4, drop_last=True)
    with pytest.raises(HarnessError, match="has 4 records, fewer than one global batch of 8"):
        shard_training_loader(loader, 4, rank=0, size=2, seed=0)


# Loader checks (both kinds)

SHARDERS = [
    pytest.param(lambda ld: shard_training_loader(ld, 2, 0, 1, 0), "training", id="training"),
    pytest.param(lambda ld: shard_validation_loader(ld, 0, 1), "validation", id="validation"),
]


@pytest.mark.parametrize("shard,which", SHARDERS)
@pytest.mark.parametrize("bad", [[1, 2, 3], IndexDataset(4), None])
def test_non_dataloader_is_an_error(shard, which, bad):
    with pytest.raises(HarnessError) as e:
        shard(bad)
    msg = str(e.value)
    assert type(bad).__name__ in msg
    assert which in msg


@pytest.mark.parametrize("shard,which", SHARDERS)
def test_iterable_dataset_is_an_error(shard, which):
    with pytest.raises(HarnessError, match=f"{which} loader wraps an IterableDataset"):
        shard(tud.DataLoader(Stream(), batch_size=2))


@pytest.mark.parametrize("shard,which", SHARDERS)
def test_custom_sampler_is_an_error(shard, which):
    class EveryOther(tud.Sampler):
        def __init__(self, n):
            self.n = n

        def __iter__(self):
            return iter(range(0, self.n, 2))

        def __len__(self):
            return (self.n + 1) // 2

    for sampler in (EveryOther(10), tud.SubsetRandomSampler(range(5))):
        loader = tud.DataLoader(IndexDataset(10), batch_size=2, sampler=sampler)
        with pytest.raises(HarnessError) as e:
            shard(loader)
        assert type(sampler).__name__ in str(e.value)
        assert which in str(e.value)


@pytest.mark.parametrize("shard,which", SHARDERS)
def test_batch_size_none_is_an_error(shard, which):
    with pytest.raises(HarnessError, match="batch_size=None"):
        shard(tud.DataLoader(IndexDataset(10), batch_size=None))


@pytest.mark.parametrize("shard,which", SHARDERS)
def test_custom_batch_sampler_says_what_to_change(shard, which):
    class Windows:  # as randomNAS's data.py: contiguous index windows of varying length
        def __iter__(self):
            yield from ([0, 1, 2], [3, 4], [5, 6, 7, 8])

        def __len__(self):
            return 3

    with pytest.raises(HarnessError) as e:
        shard(tud.DataLoader(IndexDataset(10), batch_sampler=Windows()))
    message = str(e.value)
    assert f"the {which} loader has a custom batch_sampler (Windows)" in message
    assert "shards the records across ranks and batches each rank's share itself" in message
    assert "return DataLoader(dataset, batch_size=N) without batch_sampler" in message
    assert "\n" not in message


# shard_validation_loader


def test_validation_shards_cover_every_record_exactly_once_without_padding():
    n, size = 10, 3
    loader = harness.DataLoader(IndexDataset(n), batch_size=2)
    shards = [indices(shard_validation_loader(loader, r, size)) for r in range(size)]
    flat = [i for s in shards for i in s]
    assert len(flat) == n  # no padding, no drops
    assert sorted(flat) == list(range(n))
    for a in range(size):
        for b in range(a + 1, size):
            assert not set(shards[a]) & set(shards[b])
    assert sorted(len(s) for s in shards) == [3, 3, 4]


def test_validation_loader_keeps_batch_size_and_ignores_user_shuffle():
    loader = tud.DataLoader(IndexDataset(9), batch_size=2, shuffle=True, drop_last=True)
    rebuilt = shard_validation_loader(loader, 0, 1)
    assert rebuilt.batch_size == 2
    assert rebuilt.drop_last is False
    assert indices(rebuilt) == list(range(9))
    assert isinstance(rebuilt.sampler, ShardSampler)


@pytest.mark.parametrize("n,size", [(2, 3), (0, 1), (3, 4)])
def test_validation_set_smaller_than_ranks_is_an_error(n, size):
    loader = harness.DataLoader(IndexDataset(n), batch_size=1)
    with pytest.raises(HarnessError) as e:
        shard_validation_loader(loader, 0, size)
    assert f"{n} records" in str(e.value)
    assert f"{size} ranks" in str(e.value)


def test_shard_sampler_indices():
    assert list(ShardSampler(10, 1, 3)) == [1, 4, 7]
    assert len(ShardSampler(10, 0, 3)) == 4
    assert len(ShardSampler(10, 2, 3)) == 3


# Settings carried over


def collate_tagged(records):
    return ("tagged", torch.tensor(records))


@pytest.mark.parametrize("which", ["training", "validation"])
def test_collate_fn_is_used_by_rebuilt_loader(which):
    loader = harness.DataLoader(IndexDataset(6), batch_size=3, collate_fn=collate_tagged)
    if which == "training":
        rebuilt = shard_training_loader(loader, 3, 0, 1, 0)[0]
    else:
        rebuilt = shard_validation_loader(loader, 0, 1)
    assert rebuilt.collate_fn is collate_tagged
    batches = list(rebuilt)
    assert [b[0] for b in batches] == ["tagged", "tagged"]
    assert sorted(int(i) for b in batches for i in b[1]) == list(range(6))


@pytest.mark.parametrize("which", ["training", "validation"])
def test_worker_settings_are_carried_over(which):
    def init(worker_id):
        pass

    loader = tud.DataLoader(
        IndexDataset(8),
        batch_size=2,
        num_workers=2,
        prefetch_factor=3,
        persistent_workers=True,
        worker_init_fn=init,
        collate_fn=collate_tagged,
        pin_memory=False,
        timeout=7,
    )
    if which == "training":
        rebuilt = shard_training_loader(loader, 2, 0, 2, 0)[0]
    else:
        rebuilt = shard_validation_loader(loader, 0, 2)
    assert rebuilt.num_workers == 2
    assert rebuilt.prefetch_factor == 3
    assert rebuilt.persistent_workers is True
    assert rebuilt.worker_init_fn is init
    assert rebuilt.collate_fn is collate_tagged
    assert rebuilt.timeout == 7
