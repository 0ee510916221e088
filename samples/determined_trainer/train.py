"""A Determined Trainer script (the 0.21+ form) on scikit-learn's digits, written as a Determined user would:
run it with `python train.py`, or `horovodrun -np 2 python train.py`; the harness trains it. The output goes
to $HARNESS_OUTPUT_DIR (default ./output); a second run resumes from the newest checkpoint there."""

import logging
import pathlib
from typing import Any, Dict

import determined as det
import torch
from determined import pytorch
from ruamel import yaml
from sklearn.datasets import load_digits
from torch import nn


def datasets():
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val, train = order[:357], order[357:]  # 1440 training records: 45 batches of 32
    return (
        torch.utils.data.TensorDataset(images[train], labels[train]),
        torch.utils.data.TensorDataset(images[val], labels[val]),
    )


class DigitsTrial(pytorch.PyTorchTrial):
    def __init__(self, context: pytorch.PyTorchTrialContext, hparams: Dict[str, Any]) -> None:
        self.context = context
        self.per_slot_batch_size = hparams["batch_size"] // context.distributed.get_size()
        self.model = context.wrap_model(
            nn.Sequential(
                nn.Flatten(), nn.Linear(64, hparams["hidden"]), nn.ReLU(), nn.Linear(hparams["hidden"], 10)
            )
        )
        self.optimizer = context.wrap_optimizer(torch.optim.Adam(self.model.parameters(), lr=hparams["lr"]))
        self.train_set, self.val_set = datasets()

    def build_training_data_loader(self) -> pytorch.DataLoader:
        return pytorch.DataLoader(self.train_set, batch_size=self.per_slot_batch_size, shuffle=True)

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        return pytorch.DataLoader(self.val_set, batch_size=self.per_slot_batch_size)

    def train_batch(self, batch: pytorch.TorchData, epoch_idx: int, batch_idx: int) -> Dict[str, Any]:
        data, labels = batch
        loss = nn.functional.cross_entropy(self.model(data), labels)
        self.context.backward(loss)
        self.context.step_optimizer(self.optimizer)
        return {"loss": loss}

    def evaluate_batch(self, batch: pytorch.TorchData, batch_idx: int) -> Dict[str, Any]:
        data, labels = batch
        output = self.model(data)
        return {
            "validation_loss": nn.functional.cross_entropy(output, labels).item(),
            "accuracy": (output.argmax(1) == labels).float().mean().item(),
        }


def run(local: bool = False) -> None:
    info = det.get_cluster_info()
    if local:
        conf = yaml.YAML(typ="safe", pure=True).load(
            pathlib.Path(__file__).with_name("const.yaml").read_text()
        )
        hparams = conf["hyperparameters"]
        max_length = pytorch.Epoch(3)
        latest_checkpoint = None
    else:
        hparams = info.trial.hparams
        max_length = None
        latest_checkpoint = info.latest_checkpoint

    with pytorch.init() as train_context:
        trial = DigitsTrial(train_context, hparams=hparams)
        trainer = pytorch.Trainer(trial, train_context)
        trainer.fit(
            max_length=max_length,
            validation_period=pytorch.Batch(45),
            reporting_period=pytorch.Batch(15),
            latest_checkpoint=latest_checkpoint,
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    run(local=det.get_cluster_info() is None)
