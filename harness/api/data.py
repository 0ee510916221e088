"""The DataLoader that model definitions return from ``make_data_loaders`` (``harness.DataLoader``)."""

import torch.utils.data as tud


class DataLoader(tud.DataLoader):
    """A drop-in replacement for ``torch.utils.data.DataLoader`` (same arguments).

    The harness rebuilds every loader that ``make_data_loaders`` returns around its dataset, collate_fn,
    workers etc., with a sampler that shards the data across ranks, shuffled if the loader shuffles
    (``shuffle=True`` or a RandomSampler). A plain torch DataLoader works the same way.
    """
