"""Determined 0.12's trial form on scikit-learn's digits: a context in __init__, build_model / optimizer /
create_lr_scheduler, and train_batch(batch, model, epoch_idx, batch_idx) returning the loss: the harness
runs backward and the optimizer step."""

from typing import Any, Dict

import data
import torch
from determined.pytorch import DataLoader, LRScheduler, PyTorchTrial, PyTorchTrialContext
from torch import nn


class DigitsTrial(PyTorchTrial):
    def __init__(self, context: PyTorchTrialContext) -> None:
        self.context = context
        self.train_set, self.val_set = data.get_datasets(
            context.get_data_config().get("validation_records", 360)
        )

    def build_model(self) -> nn.Module:
        hidden = self.context.get_hparam("hidden")
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.context.get_hparam("learning_rate"), momentum=0.9)

    def create_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> LRScheduler:
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
        return LRScheduler(scheduler, step_mode=LRScheduler.StepMode.STEP_EVERY_EPOCH)

    def build_training_data_loader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

    def build_validation_data_loader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.context.get_per_slot_batch_size())

    def train_batch(self, batch: Any, model: nn.Module, epoch_idx: int, batch_idx: int) -> Dict[str, Any]:
        images, labels = batch
        return {"loss": nn.functional.cross_entropy(model(images), labels)}

    def evaluate_batch(self, batch: Any, model: nn.Module) -> Dict[str, Any]:
        images, labels = batch
        output = model(images)
        return {
            "validation_loss": nn.functional.cross_entropy(output, labels),
            "accuracy": (output.argmax(1) == labels).float().mean(),
        }
