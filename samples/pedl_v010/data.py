"""PEDL's 3-argument data functions: download_data gets a directory on this machine to download into,
make_data_loaders gets the directory that download_data returned."""

import os

import numpy as np

from pedl.frameworks.pytorch.data import DataLoader


class Records:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def download_data(experiment_config, hparams, download_data_dir):
    path = os.path.join(download_data_dir, "digits.npz")
    if not os.path.exists(path):  # the directory is kept between runs: download once per machine
        from sklearn.datasets import load_digits

        digits = load_digits()
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "wb") as f:
            np.savez(f, x=(digits.images / 16.0).astype(np.float32), y=digits.target.astype(np.int64))
        os.replace(partial, path)
    return download_data_dir


def _load(download_data_dir):
    with np.load(os.path.join(download_data_dir, "digits.npz")) as data:
        return data["x"], data["y"]


def make_data_loaders(experiment_config, hparams, download_data_dir):
    x, y = _load(download_data_dir)
    return (
        DataLoader(Records(x[300:], y[300:]), batch_size=hparams["batch_size"], shuffle=True),
        DataLoader(Records(x[:300], y[:300]), batch_size=100),
    )


def collate_two_outputs(batch):
    x = np.stack([record[0] for record in batch])
    digit = np.array([record[1] for record in batch])
    return {"data": x}, {"digit_labels": digit, "high_labels": (digit >= 5).astype(np.int64)}


def make_multi_data_loaders(experiment_config, hparams, download_data_dir):
    x, y = _load(download_data_dir)
    return (
        DataLoader(
            Records(x[300:], y[300:]),
            batch_size=hparams["batch_size"],
            shuffle=True,
            collate_fn=collate_two_outputs,
        ),
        DataLoader(Records(x[:300], y[:300]), batch_size=100, collate_fn=collate_two_outputs),
    )
