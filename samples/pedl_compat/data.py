"""PEDL-style data functions: download_data writes to disk, make_data_loaders reads from there."""

import os
import tempfile

import numpy as np

import pedl
from pedl.frameworks.pytorch.data import DataLoader


class ArrayDataset:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def download_data(experiment_config, hparams):
    from sklearn.datasets import load_digits

    directory = tempfile.mkdtemp(prefix="pedl-digits-")
    digits = load_digits()
    np.save(os.path.join(directory, "x.npy"), (digits.images / 16.0).astype(np.float32))
    np.save(os.path.join(directory, "y.npy"), digits.target.astype(np.int64))
    return directory


def make_data_loaders(experiment_config, hparams):
    directory = pedl.get_download_data_dir()
    x, y = np.load(os.path.join(directory, "x.npy")), np.load(os.path.join(directory, "y.npy"))
    return (
        DataLoader(ArrayDataset(x[300:], y[300:]), batch_size=hparams["batch_size"], shuffle=True),
        DataLoader(ArrayDataset(x[:300], y[:300]), batch_size=100),
    )
