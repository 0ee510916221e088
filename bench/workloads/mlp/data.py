"""The digits data of the benchmark, in memory (scikit-learn ships it: nothing to download)."""

import os
import sys
from typing import Any, Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

import harness  # noqa: E402


def make_data_loaders(experiment_config: Dict[str, Any], hparams: Dict[str, Any]) -> Tuple[Any, Any]:
    train_set, val_set = common.datasets()
    # The harness replaces the training batch size with batch_size() / ranks and shards both loaders.
    return (
        harness.DataLoader(train_set, batch_size=1, shuffle=True, drop_last=True),
        harness.DataLoader(val_set, batch_size=common.VAL_BATCH),
    )
