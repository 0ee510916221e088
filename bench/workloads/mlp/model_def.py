"""The mlp workload as a harness model definition (trial and data in ../bench_trial.py, ../common.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_trial import make_data_loaders, trial_class  # noqa: E402, F401

BenchTrial = trial_class("mlp")
