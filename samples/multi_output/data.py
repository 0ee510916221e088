"""Digits again, shaped as a dict input and a dict target; read straight from scikit-learn (no download)."""

from typing import Any, Dict, Tuple

import numpy as np
from torch.utils.data import Dataset

import harness


class DigitsDict(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.pixels = images.reshape(len(images), -1).astype(np.float32) / 16.0
        stats = np.stack([self.pixels.mean(1), self.pixels.std(1)], axis=1)
        self.stats = stats.astype(np.float32)
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        inputs = {"pixels": self.pixels[i], "stats": self.stats[i]}
        target = {"digit": self.labels[i], "odd": self.labels[i] % 2}
        return inputs, target


def make_data_loaders(experiment_config: Dict[str, Any], hparams: Dict[str, Any]) -> Tuple[Any, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    val, train = order[:300], order[300:]
    return (
        harness.DataLoader(
            DigitsDict(digits.images[train], digits.target[train]), batch_size=32, shuffle=True
        ),
        harness.DataLoader(DigitsDict(digits.images[val], digits.target[val]), batch_size=64),
    )
