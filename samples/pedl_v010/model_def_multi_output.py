"""Two outputs from a dict input: the digit and whether it is 5 or more, with a dict of labels."""

import torch
from layers import Flatten
from torch import nn

import pedl
from pedl.frameworks.pytorch import PyTorchTrial
from pedl.frameworks.pytorch.util import error_rate


class TwoHeads(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.body = nn.Sequential(Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.digit = nn.Linear(hidden, 10)
        self.high = nn.Linear(hidden, 2)

    def forward(self, inputs):
        h = self.body(inputs["data"])
        return {"digit": self.digit(h), "high": self.high(h)}


class MultiDigitsTrial(PyTorchTrial):
    def build_model(self):
        return TwoHeads(pedl.get_hyperparameter("hidden"))

    def optimizer(self, model):
        return torch.optim.Adam(
            model.parameters(),
            lr=pedl.get_hyperparameter("learning_rate"),
            weight_decay=pedl.get_hyperparameter("weight_decay"),
        )

    def batch_size(self):
        return pedl.get_hyperparameter("batch_size")

    def losses(self, predictions, labels):
        digit = nn.functional.cross_entropy(predictions["digit"], labels["digit_labels"])
        high = nn.functional.cross_entropy(predictions["high"], labels["high_labels"])
        return {"loss": digit + high, "digit_loss": digit, "high_loss": high}

    def validation_metrics(self, predictions, labels, losses):
        return {
            "validation_error": error_rate(predictions["digit"], labels["digit_labels"]),
            "high_error": error_rate(predictions["high"], labels["high_labels"]),
            "validation_loss": losses["loss"],
        }
