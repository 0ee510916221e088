"""A model definition in PEDL's later API, as PEDL's examples wrote it: train_batch / evaluate_batch,
create_lr_scheduler, and no batch_size() (the global batch is the `global_batch_size` hyperparameter)."""

from typing import Any, Dict

import torch
from torch import nn

import pedl
from pedl.frameworks.pytorch import LRScheduler, PyTorchTrial, reset_parameters
from pedl.frameworks.pytorch.util import error_rate


class DigitsCNN(PyTorchTrial):
    def build_model(self) -> nn.Module:
        filters = pedl.get_hyperparameter("n_filters")
        model = nn.Sequential(
            nn.Conv2d(1, filters, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(pedl.get_hyperparameter("dropout")),
            nn.Linear(filters * 16, 10),
        )
        reset_parameters(model)
        return model

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=pedl.get_hyperparameter("learning_rate"), momentum=0.9)

    def create_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> LRScheduler:
        step_lr = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=pedl.get_hyperparameter("lr_step_batches"), gamma=0.5
        )
        return LRScheduler(step_lr, step_mode=LRScheduler.StepMode.STEP_EVERY_BATCH)

    def train_batch(
        self, batch: Any, model: nn.Module, epoch_idx: int, batch_idx: int
    ) -> Dict[str, torch.Tensor]:
        data, labels = batch
        output = model(data)
        loss = nn.functional.cross_entropy(output, labels)
        return {"loss": loss, "train_error": error_rate(output, labels)}

    def evaluate_batch(self, batch: Any, model: nn.Module) -> Dict[str, Any]:
        data, labels = batch
        output = model(data)
        return {
            "validation_loss": nn.functional.cross_entropy(output, labels),
            "validation_error": error_rate(output, labels),
        }
