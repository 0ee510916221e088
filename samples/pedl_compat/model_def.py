"""A model definition written for PEDL: imports only from `pedl`, uses PEDL's older signatures."""

import torch
from layers import Flatten
from torch import nn

import pedl
from pedl.frameworks.pytorch import PyTorchTrial, reset_parameters
from pedl.frameworks.pytorch.util import error_rate


class DigitsMLP(PyTorchTrial):
    def build_model(self):  # PEDL's older signature: hyperparameters via pedl.get_hyperparameter
        model = nn.Sequential(
            Flatten(),
            nn.Linear(64, pedl.get_hyperparameter("hidden")),
            nn.ReLU(),
            nn.Linear(pedl.get_hyperparameter("hidden"), 10),
        )
        reset_parameters(model)
        return model

    def optimizer(self, model, hparams):  # PEDL's older signature
        return torch.optim.SGD(model.parameters(), lr=hparams["learning_rate"], momentum=0.9)

    def batch_size(self):
        return pedl.get_hyperparameter("batch_size")

    def losses(self, predictions, labels):
        return nn.functional.cross_entropy(predictions, labels)

    def validation_metrics(self, predictions, labels, losses):
        return {"error": error_rate(predictions, labels), "validation_loss": losses}
