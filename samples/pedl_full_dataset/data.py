"""make_data_loaders without download_data: scikit-learn ships the digits data set."""

from typing import Any, Dict, Tuple

import torch
from sklearn.datasets import load_digits

import pedl
from pedl.frameworks.pytorch.data import DataLoader


def make_data_loaders(
    experiment_config: Dict[str, Any], hparams: Dict[str, Any]
) -> Tuple[DataLoader, DataLoader]:
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target)
    held_out = pedl.get_data_config()["validation_records"]
    train = torch.utils.data.TensorDataset(images[held_out:], labels[held_out:])
    validation = torch.utils.data.TensorDataset(images[:held_out], labels[:held_out])
    return (
        DataLoader(train, batch_size=pedl.get_hyperparameter("batch_size"), shuffle=True),
        DataLoader(validation, batch_size=64),
    )
