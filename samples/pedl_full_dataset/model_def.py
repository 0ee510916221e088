"""A PEDL model definition that validates with evaluate_full_dataset (its own loop over the whole
validation set), with PEDL's earlier LRScheduler keywords and pedl.get_data_config()."""

from typing import Any, Dict

import torch
from torch import nn

import pedl
from pedl.frameworks.pytorch import LRScheduler, PyTorchTrial


class DigitsMLP(PyTorchTrial):
    def build_model(self) -> nn.Module:
        hidden = pedl.get_hyperparameter("hidden")
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=pedl.get_hyperparameter("learning_rate"))

    def create_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> LRScheduler:
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=pedl.get_hyperparameter("lr_decay"))
        return LRScheduler(decay, step_every_epoch=True)

    def train_batch(self, batch: Any, model: nn.Module, epoch_idx: int, batch_idx: int) -> torch.Tensor:
        data, labels = batch
        return nn.functional.cross_entropy(model(data), labels)

    def evaluate_full_dataset(self, data_loader: Any, model: nn.Module) -> Dict[str, Any]:
        # A metric that is not a mean of per-batch values: the per-class recall, then its mean.
        predictions, targets = [], []
        for data, labels in data_loader:
            predictions.append(model(data).argmax(1))
            targets.append(labels)
        predicted, target = torch.cat(predictions), torch.cat(targets)
        recall = [(predicted[target == c] == c).float().mean() for c in target.unique()]
        return {
            "balanced_accuracy": torch.stack(recall).mean(),
            "accuracy": (predicted == target).float().mean(),
            "records_seen": len(target),
        }
