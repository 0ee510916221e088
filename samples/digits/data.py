"""Data for the digits sample: scikit-learn's bundled digits, "downloaded" to disk once per machine."""

import os
import tempfile
from typing import Any, Dict, Tuple

import numpy as np
import torch

import harness


def download_data(experiment_config: Dict[str, Any], hparams: Dict[str, Any]) -> str:
    """Write the data set to disk as a real download would (atomically: other jobs may read it)."""
    from sklearn.datasets import load_digits

    directory = experiment_config["data"].get("download_dir") or os.path.join(
        tempfile.gettempdir(), "harness-digits"
    )
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, "digits.npz")
    if not os.path.exists(target):
        digits = load_digits()
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=digits.images.astype(np.float32) / 16.0, labels=digits.target.astype(np.int64))
        os.replace(tmp, target)
    return directory


def make_data_loaders(experiment_config: Dict[str, Any], hparams: Dict[str, Any]) -> Tuple[Any, Any]:
    with np.load(os.path.join(harness.get_download_data_dir(), "digits.npz")) as f:
        images, labels = torch.from_numpy(f["images"]).unsqueeze(1), torch.from_numpy(f["labels"])
    # A fixed split: the same validation set at every np and every run.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_val = experiment_config["data"].get("validation_records", 360)
    val, train = order[:n_val], order[n_val:]
    train_set = torch.utils.data.TensorDataset(images[train], labels[train])
    val_set = torch.utils.data.TensorDataset(images[val], labels[val])
    return (
        harness.DataLoader(train_set, batch_size=hparams["global_batch_size"], shuffle=True),
        harness.DataLoader(val_set, batch_size=256),
    )
