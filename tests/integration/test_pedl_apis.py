"""PEDL's later trial API end to end under real launchers: train_batch / evaluate_batch /
evaluate_full_dataset, create_lr_scheduler, PEDL-era configs, and their errors."""

import os

import pytest
from conftest import GOOD_CONFIG, GOOD_MODEL_DEF, SAMPLES, write_model_def
from test_launchers import LAUNCHERS, assert_no_rank_traceback, assert_ok, launch, reports
from test_long_runs import RESUME_CONFIG, horovodrun, kill_and_resume_matches_straight, run_with_env

RANK = 'os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))'

# ----------------------------------------------------------------------------------------------------------
# 1. The samples, unchanged.


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_pedl_train_batch_sample(launcher, tmp_path):
    proc, _ = launch(launcher, 2, os.path.join(SAMPLES, "pedl_train_batch"), tmp_path / "out", timeout=120)
    assert_ok(proc)
    assert reports(tmp_path / "out", "validation")[-1]["metrics"]["validation_error"] < 0.2
    training = reports(tmp_path / "out", "training")
    assert [e["batches"] for e in training] == [20, 40, 60, 80, 100, 120]  # max_steps 6 x batches_per_step 20
    # StepLR(step_size=40, gamma=0.5) stepped every batch; `lr` is the rate the window's last batch used.
    assert [e["metrics"]["lr"] for e in training] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert all("train_error" in e["metrics"] for e in training)
    warnings = [line for line in proc.stderr.splitlines() if "harness: warning:" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]  # rank 0 only
    assert "ignoring cluster settings" in warnings[0] and "resources" in warnings[0]
    assert proc.stderr.count("harness: warning:") == 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_pedl_full_dataset_sample(launcher, tmp_path):
    proc, _ = launch(launcher, 2, os.path.join(SAMPLES, "pedl_full_dataset"), tmp_path / "out", timeout=120)
    assert_ok(proc)
    validation = reports(tmp_path / "out", "validation")
    assert [e["batches"] for e in validation] == [56, 112]
    assert [e["metrics"]["records_seen"] for e in validation] == [397, 397]  # each record once, not sharded
    assert validation[-1]["metrics"]["balanced_accuracy"] > 0.8
    # ExponentialLR(gamma=0.8) stepped after each epoch (28 batches): epoch k trains with 0.01 * 0.8^k.
    training = reports(tmp_path / "out", "training")
    assert [e["metrics"]["lr"] for e in training] == pytest.approx([0.01, 0.008, 0.0064, 0.00512])
    assert "harness: warning:" not in proc.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_pedl_v010_and_v011_layouts_sample(launcher, tmp_path):
    """PEDL v0.10's __init__.py entry point with const.yaml, v0.11's entrypoints: section with the other
    config; 3-argument data functions; learning rates written 5e-3 and 1e-4 (YAML 1.2 floats)."""
    sample = os.path.join(SAMPLES, "pedl_v010")
    env = {"HARNESS_DATA_DIR": str(tmp_path / "data")}
    proc, _ = launch(launcher, 2, sample, tmp_path / "v010", timeout=120, env=env)
    assert_ok(proc)
    assert "harness: warning:" not in proc.stderr
    v010 = reports(tmp_path / "v010", "validation")[-1]["metrics"]
    assert set(v010) == {"validation_error", "validation_loss"}  # __init__.py chose the single-output trial
    assert v010["validation_error"] < 0.2
    multi = os.path.join(sample, "const-multi-output.yaml")
    proc, _ = launch(launcher, 2, sample, tmp_path / "v011", "--config", multi, timeout=120, env=env)
    assert_ok(proc)
    v011 = reports(tmp_path / "v011", "validation")[-1]["metrics"]
    assert set(v011) == {"validation_error", "high_error", "validation_loss"}  # entrypoints: named both
    assert v011["validation_error"] < 0.2 and v011["high_error"] < 0.2
    # download_data(config, hparams, download_data_dir) filled one directory per data section, once
    folders = sorted(os.listdir(tmp_path / "data"))
    assert len(folders) == 2 and all(f.startswith("pedl_v010-") for f in folders)
    for folder in folders:
        assert os.listdir(tmp_path / "data" / folder) == ["digits.npz"]


# ----------------------------------------------------------------------------------------------------------
# 2, 3. evaluate_full_dataset: rank 0 alone, on the complete validation set.

# The record index travels with each record; evaluate_full_dataset writes the indices it saw to a file named
# by pid, rank and validation number. data: sleep (seconds, rank 0, first validation), train_sleep (seconds,
# rank 0, in the second training batch), fail (raise on rank 0).
FULL_MODEL = f"""
import os
import time

import torch
from torch import nn
import harness


def rank():
    return {RANK}


class Trial(harness.PyTorchTrial):
    validations = 0

    def build_model(self, hparams):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def train_batch(self, batch, model, epoch_idx, batch_idx):
        x, y, _ = batch
        if batch_idx == 1 and rank() == "0":
            time.sleep(harness.get_data_config().get("train_sleep", 0))
        return nn.functional.cross_entropy(model(x), y)

    def evaluate_full_dataset(self, data_loader, model):
        data = harness.get_data_config()
        self.validations += 1
        seen, loss, correct = [], 0.0, 0
        for x, y, index in data_loader:
            out = model(x)
            loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            seen += index.tolist()
        name = f"seen-pid{{os.getpid()}}-rank{{rank()}}-v{{self.validations}}"
        with open(os.path.join(data["log"], name), "w") as f:
            f.write(" ".join(map(str, seen)))
        if rank() == "0" and self.validations == 1:
            time.sleep(data.get("sleep", 0))
        if rank() == "0" and data.get("fail"):
            raise ValueError("evaluation failed on purpose")
        return {{"loss": loss / len(seen), "accuracy": correct / len(seen), "records": len(seen)}}
"""

FULL_DATA = """
import torch
import harness


def make_data_loaders(config, hparams):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images[:400] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:400])
    index = torch.arange(400)
    train = torch.utils.data.TensorDataset(x[:300], y[:300], index[:300])
    val = torch.utils.data.TensorDataset(x[300:], y[300:], index[300:])
    return harness.DataLoader(train, batch_size=20, shuffle=True), harness.DataLoader(val, batch_size=16)
"""

FULL_CONFIG = """
hyperparameters:
  global_batch_size: 20
searcher:
  max_length: {{batches: 6}}
min_validation_period: {{batches: 3}}
scheduling_unit: 3
reproducibility:
  experiment_seed: 1
data:
  log: {log}
"""


def full_dataset_def(model_dir, log, **data):
    log.mkdir(exist_ok=True)
    config = FULL_CONFIG.format(log=log) + "".join(f"  {k}: {v}\n" for k, v in data.items())
    return write_model_def(model_dir, model_def=FULL_MODEL, data=FULL_DATA, config=config)


def test_evaluate_full_dataset_sees_each_record_once_on_rank_0(model_dir, tmp_path):
    results = {}
    for launcher, np in [("local", 1), ("gloo", 2), ("mpi", 2)]:
        name = f"{launcher}{np}"
        log = tmp_path / f"log-{name}"
        full_dataset_def(model_dir, log)
        proc, _ = launch(launcher, np, model_dir, tmp_path / name, timeout=120)
        assert_ok(proc)
        validation = reports(tmp_path / name, "validation")
        assert [e["batches"] for e in validation] == [3, 6], name
        files = sorted(os.listdir(log))
        assert len(files) == len(validation), (name, files)  # one call per validation, by one process
        assert all("-rank0-" in f for f in files), (name, files)
        assert len({f.split("-")[1] for f in files}) == 1, (name, files)  # the same process each time
        for f in files:
            indices = [int(i) for i in (log / f).read_text().split()]
            assert sorted(indices) == list(range(300, 400)), (name, f)  # every record, exactly once
        assert all(e["metrics"]["records"] == 100 for e in validation), name
        results[name] = [e["metrics"] for e in validation]
    for name in ("gloo2", "mpi2"):
        for mine, local in zip(results[name], results["local1"]):
            for metric, value in local.items():
                assert mine[metric] == pytest.approx(value, rel=1e-5), (name, metric)


STALL_MARKERS = ("Stalled", "One or more tensors were submitted to be reduced")
# Horovod checks for stalls every HOROVOD_STALL_CHECK_TIME_SECONDS, and a tensor in its response cache is
# first moved out of the cache, then warned about: with 2 s, a stall of one rank warns only after 4-8 s, so a
# 6 s stall does not reliably warn (measured); 10 s does. Only the MPI controller of this Horovod warns at
# all: under Gloo even a plain 8 s stall of one rank prints nothing (measured with a bare hvd.allreduce).
STALL_ENV = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "2"}
STALL_SECONDS = 10


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_long_evaluate_full_dataset_does_not_stall(launcher, model_dir, tmp_path):
    """Rank 0 evaluates alone for a while, rank 1 waits in heartbeat allreduces: no stall warning.

    Under Gloo this checks only that the job completes (see STALL_SECONDS); under MPI the negative control
    below shows that the variable reaches the ranks and that a stall this long would be reported.
    """
    sleep = STALL_SECONDS if launcher == "mpi" else 6
    full_dataset_def(model_dir, tmp_path / "log", sleep=sleep)
    proc, seconds = run_with_env(horovodrun(launcher, model_dir, tmp_path / "out"), STALL_ENV, timeout=120)
    assert_ok(proc)
    assert seconds >= sleep
    output = proc.stdout + proc.stderr  # Horovod's log lines go to stdout under Gloo, stderr under MPI
    for marker in STALL_MARKERS:
        assert marker not in output, output[-3000:]
    assert [e["batches"] for e in reports(tmp_path / "out", "validation")] == [3, 6]


def test_stall_warning_negative_control(model_dir, tmp_path):
    """The same settings and a real stall as long (rank 0 sleeps in a training batch): Horovod warns."""
    full_dataset_def(model_dir, tmp_path / "log", train_sleep=STALL_SECONDS)
    proc, _ = run_with_env(horovodrun("mpi", model_dir, tmp_path / "out"), STALL_ENV, timeout=120)
    assert_ok(proc)
    assert STALL_MARKERS[1] in proc.stdout + proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# 4. train_batch / evaluate_batch: the same numbers at any number of ranks, and as the losses API.

BATCH_MODEL_DEF = """
import torch
from torch import nn
import harness


class Trial(harness.PyTorchTrial):
    def build_model(self, hparams):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def train_batch(self, batch, model, epoch_idx, batch_idx):
        inputs, labels = batch
        loss = nn.functional.cross_entropy(model(inputs), labels)
        return {"loss": loss, "batch_idx": float(batch_idx), "epoch_idx": float(epoch_idx)}

    def evaluate_batch(self, batch, model):
        inputs, labels = batch
        predictions = model(inputs)
        return {
            "loss": nn.functional.cross_entropy(predictions, labels),
            "accuracy": (predictions.argmax(1) == labels).float().mean(),
        }
"""

# 18 batches of 20: 15 per epoch, so the last report window is in epoch 1.
LENGTH = "max_length: {batches: 18}"
BATCH_CONFIG = GOOD_CONFIG.replace("batch: 20", "global_batch_size: 20").replace(
    "max_length: {batches: 6}", LENGTH
)


def test_train_batch_matches_across_ranks_and_the_losses_api(model_dir, tmp_path):
    write_model_def(tmp_path / "losses", config=GOOD_CONFIG.replace("max_length: {batches: 6}", LENGTH))
    proc, _ = launch("local", 1, tmp_path / "losses", tmp_path / "out-losses", timeout=120)
    assert_ok(proc)
    reference = reports(tmp_path / "out-losses")

    write_model_def(model_dir, model_def=BATCH_MODEL_DEF, config=BATCH_CONFIG)
    for launcher, np in [("local", 1), ("gloo", 2), ("mpi", 2)]:
        out = tmp_path / f"out-{launcher}{np}"
        proc, _ = launch(launcher, np, model_dir, out, timeout=120)
        assert_ok(proc)
        assert "trial API train_batch/evaluate_batch" in proc.stdout
        got = reports(out)
        assert [(e["type"], e["batches"]) for e in got] == [(e["type"], e["batches"]) for e in reference]
        for mine, theirs in zip(got, reference):
            for metric, value in theirs["metrics"].items():
                assert mine["metrics"][metric] == pytest.approx(value, rel=1e-5), (launcher, mine, metric)
        # batch_idx: global batches so far (0-based); epoch_idx: the epoch of that batch (window means).
        training = [e["metrics"] for e in got if e["type"] == "training"]
        assert [m["batch_idx"] for m in training] == pytest.approx([1, 4, 7, 10, 13, 16])
        assert [m["epoch_idx"] for m in training] == pytest.approx([0, 0, 0, 0, 0, 1])
        assert "lr" not in training[0]  # no scheduler, no lr


# ----------------------------------------------------------------------------------------------------------
# 5. Exact resume after SIGKILL with an LR scheduler.

# Dropout, momentum, shuffled data; rank 1 SIGKILLs itself in global batch KILL_AT, once (MARKER records it).
RESUME_BATCH_MODEL = f"""
import os
import signal

import torch
from torch import nn
import harness
from pedl.frameworks.pytorch import LRScheduler


class Trial(harness.PyTorchTrial):
    def build_model(self, hparams):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 10))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def create_lr_scheduler(self, optimizer):
        if harness.get_hyperparameter("step_mode") == "batch":
            sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
            return LRScheduler(sched, step_mode=LRScheduler.StepMode.STEP_EVERY_BATCH)
        sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return LRScheduler(sched, step_mode=LRScheduler.StepMode.STEP_EVERY_EPOCH)

    def train_batch(self, batch, model, epoch_idx, batch_idx):
        marker = os.environ.get("MARKER", "")
        kill = batch_idx + 1 == int(os.environ.get("KILL_AT", "0")) and not os.path.exists(marker)
        if kill and {RANK} == "1":
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        inputs, labels = batch
        return nn.functional.cross_entropy(model(inputs), labels)

    def evaluate_batch(self, batch, model):
        inputs, labels = batch
        predictions = model(inputs)
        return {{"accuracy": (predictions.argmax(1) == labels).float().mean()}}
"""


def expected_lr(step_mode, batch):
    """The learning rate global batch `batch` (1-based) trains with: 15 batches per epoch."""
    if step_mode == "batch":
        return 0.05 * 0.7 ** ((batch - 1) // 4)
    return 0.05 * 0.5 ** ((batch - 1) // 15)


@pytest.mark.parametrize("step_mode", ["batch", "epoch"])
def test_resume_after_sigkill_with_lr_scheduler_is_exact(step_mode, model_dir, tmp_path):
    assert "checkpoint_policy: none" in RESUME_CONFIG  # else validations add checkpoints (resume batch moves)
    config = RESUME_CONFIG.replace("batch: 20", f"global_batch_size: 20\n  step_mode: {step_mode}")
    write_model_def(model_dir, model_def=RESUME_BATCH_MODEL, config=config)
    (a, b), _, kill_at = kill_and_resume_matches_straight(model_dir, tmp_path)
    for run in (a, b):
        lrs = [(e["batches"], e["metrics"]["lr"]) for e in run if e["type"] == "training"]
        assert len(lrs) == 10
        for batch, lr in lrs:
            assert lr == pytest.approx(expected_lr(step_mode, batch), rel=1e-9), (batch, kill_at)


# ----------------------------------------------------------------------------------------------------------
# 6. Errors: one line, the right exit status, no hang.

INCOMPLETE_MODEL = GOOD_MODEL_DEF.replace(
    "    def losses(self, predictions, labels):",
    "    def train_batch(self, batch, model, epoch_idx, batch_idx):\n"
    "        return nn.functional.cross_entropy(model(batch[0]), batch[1])\n\n"
    "    def _losses(self, predictions, labels):",
).replace("def validation_metrics(", "def _validation_metrics(")

MISSING_PEDL_NAME = "from pedl.frameworks.pytorch import NoSuchThing\n" + GOOD_MODEL_DEF

ERROR_CASES = {
    "incomplete-api": (
        dict(model_def=INCOMPLETE_MODEL),
        2,
        [
            "class Trial completes no trial API",
            "the train_batch/evaluate_batch API lacks evaluate_batch() or evaluate_full_dataset()",
            "the losses/validation_metrics API lacks losses(), validation_metrics()",
        ],
    ),
    "no-batch-size": (
        dict(model_def=BATCH_MODEL_DEF),  # no batch_size(); GOOD_CONFIG's hyperparameter is `batch`
        2,
        ["no global batch size", "batch_size()", "global_batch_size", "batch_size) in the config"],
    ),
    "unsupported-pedl-name": (
        dict(model_def=MISSING_PEDL_NAME),
        2,
        [
            "pedl.frameworks.pytorch.NoSuchThing",
            "pedl.frameworks.pytorch: DataLoader, LRScheduler, PyTorchTrial, TorchData, reset_parameters",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_definition_single_line_error(case, model_dir, tmp_path):
    files, status, fragments = ERROR_CASES[case]
    write_model_def(model_dir, **files)
    proc, seconds = launch("gloo", 2, model_dir, tmp_path / "out", timeout=60)
    # horovodrun --gloo itself exits 1 when a rank fails, and names the first failed rank's exit status.
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert f"Exit code: {status}" in proc.stderr, proc.stderr[-3000:]
    assert seconds < 30
    errors = [line for line in proc.stderr.splitlines() if "harness: error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert_no_rank_traceback(proc.stderr)


def test_evaluate_full_dataset_raising_on_rank_0_ends_the_job(model_dir, tmp_path):
    full_dataset_def(model_dir, tmp_path / "log", fail="true")
    proc, seconds = launch("gloo", 2, model_dir, tmp_path / "out", timeout=60)
    assert proc.returncode != 0
    assert seconds < 30, seconds
    line = next(
        (x for x in proc.stderr.splitlines() if "ValueError: evaluation failed on purpose" in x), None
    )
    assert line is not None, proc.stderr[-3000:]
    assert "harness: error:" in line and "model_def.py:" in line and "evaluate_full_dataset" in line
    assert_no_rank_traceback(proc.stderr)
    assert reports(tmp_path / "out", "validation") == []
