"""Shared helpers: write small model definitions into temporary folders."""

import os
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "samples")

# A small, deterministic model definition on real data (scikit-learn's digits). Tests replace parts of it.
GOOD_MODEL_DEF = """
import numpy as np
import torch
from torch import nn
import harness


class Trial(harness.PyTorchTrial):
    def build_model(self, hparams):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def batch_size(self):
        return harness.get_hyperparameter("batch")

    def losses(self, predictions, labels):
        return nn.functional.cross_entropy(predictions, labels)

    def validation_metrics(self, predictions, labels, losses):
        return {"loss": losses, "accuracy": (predictions.argmax(1) == labels).float().mean()}
"""

GOOD_DATA = """
import numpy as np
import torch
import harness


def make_data_loaders(config, hparams):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images[:400] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:400])
    train = torch.utils.data.TensorDataset(x[:300], y[:300])
    val = torch.utils.data.TensorDataset(x[300:], y[300:])
    return harness.DataLoader(train, batch_size=20, shuffle=True), harness.DataLoader(val, batch_size=16)
"""

GOOD_CONFIG = """
hyperparameters:
  batch: 20
searcher:
  max_length: {batches: 6}
scheduling_unit: 3
reproducibility:
  experiment_seed: 1
"""


def write_model_def(directory, model_def=GOOD_MODEL_DEF, data=GOOD_DATA, config=GOOD_CONFIG, **extra):
    """Write model_def.py, data.py, experiment.yaml (and any `name=text` extra files) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    files = {"model_def.py": model_def, "data.py": data, "experiment.yaml": config}
    files.update({k.replace("__", "."): v for k, v in extra.items()})
    for name, text in files.items():
        if text is not None:
            with open(os.path.join(directory, name), "w") as f:
                f.write(textwrap.dedent(text))
    return str(directory)


@pytest.fixture
def model_dir(tmp_path):
    """A fresh folder for a model definition; the modules it imports are forgotten afterwards."""
    before = set(sys.modules)
    path = tmp_path / "model"
    yield path
    for name in set(sys.modules) - before:
        mod = sys.modules.get(name)
        if getattr(mod, "__file__", "") and str(tmp_path) in (mod.__file__ or ""):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not p.startswith(str(tmp_path))]


# The train_batch API with evaluate_full_dataset (rank 0 alone over the whole validation set).
FULL_DATASET_MODEL_DEF = """
import torch
from torch import nn
import harness


class Trial(harness.PyTorchTrial):
    def build_model(self):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def train_batch(self, batch, model, epoch_idx, batch_idx):
        data, labels = batch
        return nn.functional.cross_entropy(model(data), labels)

    def evaluate_full_dataset(self, data_loader, model):
        predicted = torch.cat([model(x).argmax(1) for x, _ in data_loader])
        target = torch.cat([y for _, y in data_loader])
        recall = [(predicted[target == c] == c).float().mean() for c in target.unique()]
        return {"balanced_accuracy": torch.stack(recall).mean(), "records_seen": len(target)}
"""


# ----------------------------------------------------------------------------------------------------------
# Test tiers. Each test has one: a marker of its own, else its folder's (tests/unit -> unit, ...).
#   unit         in one process, no subprocess (enforced below); `make test-fast` runs this tier alone
#   integration  real launchers (horovodrun, mpirun, harness launch) and the harness's own commands
#   container    the images, built with buildah or docker
#   multihost    network namespaces as hosts, with their own sshd
#   gpu          needs CUDA (skipped without)
TIERS = ("unit", "integration", "container", "multihost", "gpu")
FOLDER_TIER = {"unit": "unit", "integration": "integration", "bench": "integration", "container": "container"}
FOLDER_TIER.update(multihost="multihost", gpu="gpu")
_tier_seconds = {}


def tier_of(item):
    own = [t for t in TIERS if item.get_closest_marker(t)]
    return own[0] if own else None


_tier_by_test = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if tier_of(item) is None:
            folder = os.path.basename(os.path.dirname(str(item.fspath)))
            item.add_marker(getattr(pytest.mark, FOLDER_TIER.get(folder, "integration")))
        _tier_by_test[item.nodeid] = tier_of(item)


def pytest_sessionstart(session):
    # Matplotlib builds its font cache on first use by running fc-list: done here, once, so that a unit
    # test that draws (harness plot) stays in one process on a machine that never ran matplotlib.
    try:
        import matplotlib.font_manager  # noqa: F401
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_one_process(request, monkeypatch):
    """A unit test that starts a process is in the wrong tier: it fails, naming the command."""
    if tier_of(request.node) != "unit":
        yield
        return
    import subprocess

    def refuse(args, *rest, **kw):
        raise AssertionError(f"a unit test runs in one process; it started {args!r}: mark it integration")

    monkeypatch.setattr(subprocess, "Popen", refuse)  # subprocess.run and check_output go through it
    yield


def pytest_runtest_logreport(report):
    tier = _tier_by_test.get(report.nodeid, "integration")  # (keywords hold folder names too: not those)
    seconds, count = _tier_seconds.get(tier, (0.0, 0))
    _tier_seconds[tier] = (seconds + report.duration, count + (report.when == "call"))


def pytest_terminal_summary(terminalreporter):
    if _tier_seconds:
        shown = ", ".join(
            f"{t} {s:.0f} s ({n} tests)" for t in TIERS for s, n in [_tier_seconds.get(t, (0, 0))] if n
        )
        terminalreporter.write_line(f"time per tier: {shown}")


@pytest.fixture
def forget_modules(tmp_path):
    """Modules a test imported from its tmp_path (model definitions), and those paths, gone after it."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if str(tmp_path) in (getattr(sys.modules.get(name), "__file__", "") or ""):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not p.startswith(str(tmp_path))]
