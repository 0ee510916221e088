"""Determined's PyTorchTrial API on scikit-learn's digits: wrap_model / wrap_optimizer, an LR scheduler,
a custom metric reducer and a callback with state, written as a Determined user would."""

from typing import Any, Dict, List

import data
import torch
from determined.pytorch import (
    DataLoader,
    LRScheduler,
    MetricReducer,
    PyTorchCallback,
    PyTorchTrial,
    PyTorchTrialContext,
)
from torch import nn


class ConfusionCounts(MetricReducer):
    """Per-class recall over the whole validation set, exact at any number of ranks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.hits = torch.zeros(10)
        self.totals = torch.zeros(10)

    def update(self, labels: torch.Tensor, predictions: torch.Tensor) -> None:
        labels, predictions = labels.cpu(), predictions.cpu()
        self.totals += torch.bincount(labels, minlength=10).float()
        self.hits += torch.bincount(labels[labels == predictions], minlength=10).float()

    def per_slot_reduce(self) -> Any:
        return self.hits, self.totals

    def cross_slot_reduce(self, per_slot_metrics: List[Any]) -> Dict[str, float]:
        hits = sum(h for h, _ in per_slot_metrics)
        totals = sum(t for _, t in per_slot_metrics)
        recall = hits / totals.clamp(min=1)
        return {"min_class_recall": float(recall.min())}


class EpochCounter(PyTorchCallback):
    """Counts finished epochs; its state goes into every checkpoint."""

    def __init__(self) -> None:
        self.epochs = 0

    def on_training_epoch_end(self, epoch_idx: int) -> None:
        self.epochs += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.epochs = state_dict["epochs"]


class DigitsTrial(PyTorchTrial):
    def __init__(self, context: PyTorchTrialContext) -> None:
        self.context = context
        width = context.get_hparam("width")
        self.model = context.wrap_model(
            nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(width * 4 * 4, 64),
                nn.ReLU(),
                nn.Linear(64, 10),
            )
        )
        self.optimizer = context.wrap_optimizer(
            torch.optim.SGD(self.model.parameters(), lr=context.get_hparam("learning_rate"), momentum=0.9)
        )
        self.scheduler = context.wrap_lr_scheduler(
            torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.8),
            step_mode=LRScheduler.StepMode.STEP_EVERY_EPOCH,
        )
        self.recall = context.wrap_reducer(ConfusionCounts(), for_training=False)
        validation_records = context.get_data_config().get("validation_records", 360)
        self.train_set, self.val_set = data.get_datasets(validation_records)

    def build_callbacks(self) -> Dict[str, PyTorchCallback]:
        self.epochs = EpochCounter()
        return {"epochs": self.epochs}

    def build_training_data_loader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

    def build_validation_data_loader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.context.get_per_slot_batch_size())

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> Dict[str, Any]:
        images, labels = batch
        output = self.model(images)
        loss = nn.functional.cross_entropy(output, labels)
        self.context.backward(loss)
        self.context.step_optimizer(self.optimizer)
        return {"loss": loss, "accuracy": (output.argmax(1) == labels).float().mean()}

    def evaluate_batch(self, batch: Any) -> Dict[str, Any]:
        images, labels = batch
        output = self.model(images)
        self.recall.update(labels, output.argmax(1))
        return {
            "validation_loss": nn.functional.cross_entropy(output, labels),
            "accuracy": (output.argmax(1) == labels).float().mean(),
        }
