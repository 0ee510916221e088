"""The harness model definition of every bench workload: workloads/<w>/model_def.py names the workload.

The model, optimizer and data live in common.py (shared with the other contenders); this module only adds
what the harness asks of a model definition: a PyTorchTrial and make_data_loaders.
"""

from typing import Any, Dict, Tuple, Type

import common
import torch
from torch import nn

import harness

common.PROBE.install()


def trial_class(workload: str) -> Type[harness.PyTorchTrial]:
    """The PyTorchTrial that trains `workload` (a key of common.WORKLOADS)."""

    class BenchTrial(harness.PyTorchTrial):
        def build_model(self, hparams: Dict[str, Any]) -> nn.Module:
            return common.build_model(workload)

        def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
            return common.build_optimizer(workload, model)

        def batch_size(self) -> int:
            return common.WORKLOADS[workload].global_batch

        def losses(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(predictions, labels)

        def validation_metrics(self, predictions, labels, losses) -> Dict[str, Any]:
            return {"loss": losses, "accuracy": (predictions.argmax(1) == labels).float().mean()}

    return BenchTrial


def batch_api_trial_class(workload: str) -> Type[harness.PyTorchTrial]:
    """The same trial in PEDL's later API (train_batch / evaluate_batch; the global batch as batch_size())."""
    base = trial_class(workload)

    class BenchBatchTrial(harness.PyTorchTrial):
        build_model = base.build_model
        optimizer = base.optimizer
        batch_size = base.batch_size

        def train_batch(self, batch: Any, model: nn.Module, epoch_idx: int, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(model(x), y)

        def evaluate_batch(self, batch: Any, model: nn.Module) -> Dict[str, Any]:
            x, y = batch
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            return {"loss": loss, "accuracy": (out.argmax(1) == y).float().mean()}

    return BenchBatchTrial


def context_api_trial_class(workload: str) -> type:
    """The same trial in Determined's API: made with a context, it wraps the model and optimizer and steps
    them itself (imported on use: `determined` is the harness's, on sys.path once a definition is loaded)."""
    from determined.pytorch import DataLoader, PyTorchTrial

    class BenchContextTrial(PyTorchTrial):
        def __init__(self, context: Any) -> None:
            self.context = context
            self.model = context.wrap_model(common.build_model(workload))
            self.opt = context.wrap_optimizer(common.build_optimizer(workload, self.model))

        def batch_size(self) -> int:
            return common.WORKLOADS[workload].global_batch

        def build_training_data_loader(self) -> Any:
            train_set, _ = common.datasets()
            return DataLoader(train_set, batch_size=1, shuffle=True, drop_last=True)

        def build_validation_data_loader(self) -> Any:
            _, val_set = common.datasets()
            return DataLoader(val_set, batch_size=common.VAL_BATCH)

        def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.model(x), y)
            self.context.backward(loss)
            self.context.step_optimizer(self.opt)
            return loss

        def evaluate_batch(self, batch: Any) -> Dict[str, Any]:
            x, y = batch
            out = self.model(x)
            loss = nn.functional.cross_entropy(out, y)
            return {"loss": loss, "accuracy": (out.argmax(1) == y).float().mean()}

    return BenchContextTrial


def make_data_loaders(experiment_config: Dict[str, Any], hparams: Dict[str, Any]) -> Tuple[Any, Any]:
    """The digits data, in memory (scikit-learn ships it: nothing to download)."""
    train_set, val_set = common.datasets()
    # The harness replaces the training batch size with batch_size() / ranks and shards both loaders.
    return (
        harness.DataLoader(train_set, batch_size=1, shuffle=True, drop_last=True),
        harness.DataLoader(val_set, batch_size=common.VAL_BATCH),
    )
