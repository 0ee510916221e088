"""ResNet-18 on synthetic images as a harness model definition (PEDL's first API); the network, data and
optimizer live in amp_common.py, shared with the hand-written loop of tests/gpu/amp_loop.py.

Precision is not set here: the config's ``optimizations: {mixed_precision: ...}`` chooses it (experiment.yaml
trains with O1, fp16 autocast with a loss scaler; tests/gpu/amp_bench.py writes one config per precision).
"""

from typing import Any, Dict, Tuple

import amp_common
import torch
from torch import nn

import harness


class AmpTrial(harness.PyTorchTrial):
    def build_model(self, hparams: Dict[str, Any]) -> nn.Module:
        return amp_common.build_model(hparams)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return amp_common.build_optimizer(model, harness.get_hyperparameters())

    def batch_size(self) -> int:
        return harness.get_hyperparameter("global_batch_size")

    def losses(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(predictions, labels)

    def validation_metrics(self, predictions, labels, losses) -> Dict[str, Any]:
        return {
            "validation_loss": losses,
            "accuracy": (predictions.argmax(1) == labels).float().mean(),
        }


def make_data_loaders(experiment_config: Dict[str, Any], hparams: Dict[str, Any]) -> Tuple[Any, Any]:
    data = experiment_config["data"]
    train_set, val_set = amp_common.datasets(data)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    kw = amp_common.loader_kwargs(data, device_type)
    # The harness sets the training batch (global batch / ranks) and shards both loaders.
    return (
        harness.DataLoader(train_set, batch_size=1, shuffle=True, drop_last=True, **kw),
        harness.DataLoader(val_set, batch_size=int(data.get("validation_batch", 512)), **kw),
    )
