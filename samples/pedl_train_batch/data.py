"""PEDL-style data functions: download_data writes the data set to disk, make_data_loaders reads it."""

import os
import tempfile
from typing import Any, Dict, Tuple

import numpy as np
import torch

import pedl
from pedl.frameworks.pytorch.data import DataLoader


def download_data(experiment_config: Dict[str, Any], hparams: Dict[str, Any]) -> str:
    from sklearn.datasets import load_digits

    directory = tempfile.mkdtemp(prefix="pedl-digits-")
    digits = load_digits()
    np.save(os.path.join(directory, "images.npy"), (digits.images / 16.0).astype(np.float32))
    np.save(os.path.join(directory, "labels.npy"), digits.target.astype(np.int64))
    return directory


def make_data_loaders(
    experiment_config: Dict[str, Any], hparams: Dict[str, Any]
) -> Tuple[DataLoader, DataLoader]:
    directory = pedl.get_download_data_dir()
    images = torch.from_numpy(np.load(os.path.join(directory, "images.npy"))).unsqueeze(1)
    labels = torch.from_numpy(np.load(os.path.join(directory, "labels.npy")))
    held_out = pedl.get_data_config().get("validation_records", 300)
    train = torch.utils.data.TensorDataset(images[held_out:], labels[held_out:])
    validation = torch.utils.data.TensorDataset(images[:held_out], labels[:held_out])
    return (
        DataLoader(train, batch_size=hparams["global_batch_size"], shuffle=True),
        DataLoader(validation, batch_size=100),
    )
