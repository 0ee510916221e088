"""The mlp workload as a harness model definition (the model and data live in ../common.py)."""

import os
import sys
from typing import Any, Dict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

import harness  # noqa: E402

WORKLOAD = "mlp"
common.PROBE.install()


class BenchTrial(harness.PyTorchTrial):
    def build_model(self, hparams: Dict[str, Any]) -> nn.Module:
        return common.build_model(WORKLOAD)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return common.build_optimizer(WORKLOAD, model)

    def batch_size(self) -> int:
        return common.WORKLOADS[WORKLOAD].global_batch

    def losses(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(predictions, labels)

    def validation_metrics(self, predictions, labels, losses) -> Dict[str, Any]:
        return {"loss": losses, "accuracy": (predictions.argmax(1) == labels).float().mean()}
