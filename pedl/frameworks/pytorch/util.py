"""``pedl.frameworks.pytorch.util``: metric helpers."""

import torch


def error_rate(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of records whose arg-max prediction differs from the label."""
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(
            f"predictions and labels differ in length: {predictions.shape[0]} vs {labels.shape[0]}"
        )
    labels = labels.reshape(-1)
    return 1.0 - float((predictions.argmax(dim=1) == labels).float().mean().item())
