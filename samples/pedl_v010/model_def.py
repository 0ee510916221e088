"""One output: the digit. PEDL's first trial API (the harness runs the forward pass)."""

import torch
from layers import Flatten
from torch import nn

import pedl
from pedl.frameworks.pytorch import PyTorchTrial
from pedl.frameworks.pytorch.util import error_rate


class DigitsTrial(PyTorchTrial):
    def build_model(self):
        hidden = pedl.get_hyperparameter("hidden")
        return nn.Sequential(Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def optimizer(self, model):
        return torch.optim.Adam(
            model.parameters(),
            lr=pedl.get_hyperparameter("learning_rate"),
            weight_decay=pedl.get_hyperparameter("weight_decay"),
        )

    def batch_size(self):
        return pedl.get_hyperparameter("batch_size")

    def losses(self, predictions, labels):
        return nn.functional.cross_entropy(predictions, labels)

    def validation_metrics(self, predictions, labels, losses):
        return {"validation_error": error_rate(predictions, labels), "validation_loss": losses}
