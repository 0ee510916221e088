"""A small CNN on scikit-learn's handwritten digits (8x8 images, 10 classes)."""

from typing import Any, Dict

import torch
from torch import nn

import harness


class DigitsTrial(harness.PyTorchTrial):
    def build_model(self, hparams: Dict[str, Any]) -> nn.Module:
        width = hparams["width"]
        return nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=harness.get_hyperparameter("learning_rate"))

    def batch_size(self) -> int:
        return harness.get_hyperparameter("global_batch_size")

    def losses(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(predictions, labels)

    def training_metrics(self, predictions, labels, losses) -> Dict[str, Any]:
        return {"accuracy": (predictions.argmax(1) == labels).float().mean()}

    def validation_metrics(self, predictions, labels, losses) -> Dict[str, Any]:
        return {
            "validation_loss": losses,
            "accuracy": (predictions.argmax(1) == labels).float().mean(),
        }
