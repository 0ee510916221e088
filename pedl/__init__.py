"""Compatibility package: model definitions written for PEDL import from here and run unchanged."""

from harness.trial import get_download_data_dir, get_hyperparameter

__all__ = ["get_download_data_dir", "get_hyperparameter"]
