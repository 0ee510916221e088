"""Two outputs from a dict input: the digit (10 classes) and whether it is odd, with a dict of losses.

Shows: a dict as the model's input, a dict of predictions, a dict of losses with the key "loss",
training metrics, and non-scalar validation metrics (averaged elementwise over the validation set).
"""

from typing import Any, Dict

import torch
from torch import nn

import harness


class TwoHeads(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64 + 2, hidden), nn.ReLU())
        self.digit = nn.Linear(hidden, 10)
        self.odd = nn.Linear(hidden, 2)

    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x = torch.cat([inputs["pixels"], inputs["stats"]], dim=1)
        h = self.body(x)
        return {"digit": self.digit(h), "odd": self.odd(h)}


class MultiOutputTrial(harness.PyTorchTrial):
    def build_model(self, hparams: Dict[str, Any]) -> nn.Module:
        return TwoHeads(hparams["hidden"])

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(), lr=harness.get_hyperparameter("learning_rate"), momentum=0.9
        )

    def batch_size(self) -> int:
        return harness.get_hyperparameter("global_batch_size")

    def losses(self, predictions, labels) -> Dict[str, torch.Tensor]:
        digit = nn.functional.cross_entropy(predictions["digit"], labels["digit"])
        odd = nn.functional.cross_entropy(predictions["odd"], labels["odd"])
        return {"loss": digit + 0.5 * odd, "digit_loss": digit, "odd_loss": odd}

    def training_metrics(self, predictions, labels, losses) -> Dict[str, Any]:
        return {"digit_accuracy": (predictions["digit"].argmax(1) == labels["digit"]).float().mean()}

    def validation_metrics(self, predictions, labels, losses) -> Dict[str, Any]:
        digit_ok = predictions["digit"].argmax(1) == labels["digit"]
        odd_ok = predictions["odd"].argmax(1) == labels["odd"]
        wrong = (~digit_ok).float()
        # error_share[c]: the fraction of records that are digit c and misclassified. Averaged over the
        # whole set it sums to the error rate, and says which digits the errors come from.
        error_share = torch.zeros(10, device=wrong.device).index_add_(0, labels["digit"], wrong) / len(wrong)
        return {
            "loss": losses["loss"],
            "accuracy": torch.stack([digit_ok.float().mean(), odd_ok.float().mean()]),  # [digit, odd]
            "error_share": error_share,
        }
