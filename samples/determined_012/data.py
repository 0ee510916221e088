"""Data for the Determined-style digits sample: scikit-learn's bundled digits (no download)."""

from typing import Tuple

import torch
from torch.utils.data import TensorDataset


def get_datasets(validation_records: int = 360) -> Tuple[TensorDataset, TensorDataset]:
    """(training, validation): a fixed split, the same at every np and every run."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val, train = order[:validation_records], order[validation_records:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])
