"""Training options under real launchers: aggregation, clipping, bf16, compression, Horovod tuning, and the
Horovod + GradScaler step order."""

import os
import sys

import pytest
import runner
import torch
from conftest import GOOD_DATA, ROOT, write_model_def
from test_launchers import assert_ok, launch, reports
from test_long_runs import RESUME_CONFIG, RESUME_MODEL, final_weights, kill_and_resume_matches_straight

# PEDL's later API, no batch-dependent layers, momentum: k batches of b must equal one batch of k*b.
BATCH_API_MODEL = """
import torch
from torch import nn
import harness


class Trial(harness.PyTorchTrial):
    def build_model(self, hparams):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    def train_batch(self, batch, model, epoch_idx, batch_idx):
        x, y = batch
        return {"loss": nn.functional.cross_entropy(model(x), y)}

    def evaluate_batch(self, batch, model):
        x, y = batch
        out = model(x)
        return {"loss": nn.functional.cross_entropy(out, y), "accuracy": (out.argmax(1) == y).float().mean()}
"""

DATA = GOOD_DATA.replace("x[:300], y[:300]", "x[:320], y[:320]").replace(
    "x[300:], y[300:]", "x[320:], y[320:]"
)


def config(global_batch, options="", epochs=2, hparams=""):
    return f"""
hyperparameters: {{global_batch_size: {global_batch}{hparams}}}
searcher: {{metric: accuracy, smaller_is_better: false, max_length: {{epochs: {epochs}}}}}
scheduling_unit: 5
reproducibility: {{experiment_seed: 9}}
{options}
"""


def trained(tmp_path, name, launcher, np, global_batch, options="", model=BATCH_API_MODEL, env=None):
    model_dir = write_model_def(
        tmp_path / name, model_def=model, data=DATA, config=config(global_batch, options)
    )
    out = tmp_path / f"{name}-out"
    proc, _ = launch(launcher, np, model_dir, out, timeout=240, env=env)
    assert_ok(proc)
    return proc, final_weights(out)[1], out


def max_difference(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("launcher, np", [("local", 1), ("gloo", 2), ("mpi", 2)])
def test_aggregating_two_batches_trains_like_one_batch_twice_as_large(tmp_path, launcher, np):
    _, big, _ = trained(tmp_path, "k1", launcher, np, 32)
    proc, small, out = trained(tmp_path, "k2", launcher, np, 16, "optimizations: {aggregation_frequency: 2}")
    assert "aggregation 2" in proc.stdout
    assert max_difference(big, small) <= 2e-5
    # A batch is one train_batch call of the global batch: twice as many of them, the same records.
    assert reports(out, "training")[-1]["batches"] == 40 and reports(out, "training")[-1]["records"] == 640
    _, unaveraged, _ = trained(
        tmp_path,
        "k2sum",
        launcher,
        np,
        16,
        "optimizations: {aggregation_frequency: 2, average_aggregated_gradients: false}",
    )
    assert max_difference(big, unaveraged) > 1e-3  # the option is honoured: summed, not averaged


def test_clipping_at_two_ranks_matches_one_process(tmp_path):
    clip = config(32, hparams=", clip_grad_l2_norm: 0.2")  # PEDL's spelling
    one = write_model_def(tmp_path / "one", model_def=BATCH_API_MODEL, data=DATA, config=clip)
    proc, _ = launch("local", 1, one, tmp_path / "one-out")
    assert_ok(proc)
    proc, _ = launch("mpi", 2, one, tmp_path / "two-out")
    assert_ok(proc)
    assert "clip L2 norm 0.2" in proc.stdout
    a, b = final_weights(tmp_path / "one-out")[1], final_weights(tmp_path / "two-out")[1]
    assert max_difference(a, b) <= 2e-5
    _, unclipped, _ = trained(tmp_path, "noclip", "local", 1, 32)
    assert max_difference(a, unclipped) > 1e-3  # the clip did bite


def test_resume_in_mid_aggregation_window_with_bf16_and_clipping_is_exact(model_dir, tmp_path):
    """Rank 1 is SIGKILLed at a random batch; the run resumes from the checkpoint of batch 4, 8, ... or 24,
    all inside windows of 7 (and the 30 batches end inside one too)."""
    options = "optimizations: {aggregation_frequency: 7, mixed_precision: bf16, clip_grad_val: 0.05}\n"
    write_model_def(model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG + options)
    kill_and_resume_matches_straight(model_dir, tmp_path)


def test_bf16_autocast_trains_on_cpu_at_two_ranks(tmp_path):
    _, fp32, _ = trained(tmp_path, "fp32", "gloo", 2, 32)
    proc, bf16, out = trained(tmp_path, "bf16", "gloo", 2, 32, "optimizations: {mixed_precision: bf16}")
    assert "bf16 autocast" in proc.stdout
    losses = [e["metrics"]["loss"] for e in reports(out, "training")]
    assert losses[-1] < 0.7 * losses[0]
    assert reports(out, "validation")[-1]["metrics"]["accuracy"] > 0.8
    assert max_difference(fp32, bf16) > 1e-4  # the forward pass did run in bf16


def test_fp16_compression_reaches_the_allreduce(tmp_path):
    _, plain, _ = trained(tmp_path, "plain", "gloo", 2, 32)
    proc, compressed, _ = trained(
        tmp_path, "fp16", "gloo", 2, 32, "optimizations: {gradient_compression: true}"
    )
    assert "fp16 gradient compression" in proc.stdout
    difference = max_difference(plain, compressed)
    assert 0 < difference < 0.05  # rounded to fp16 on the wire: close, never bit-identical


def test_horovod_tuning_reaches_horovod_and_the_environment_wins(tmp_path):
    log = tmp_path / "autotune.csv"
    options = "optimizations: {auto_tune_tensor_fusion: true, tensor_fusion_threshold: 8}"
    proc, _, _ = trained(
        tmp_path,
        "tuned",
        "gloo",
        2,
        32,
        options,
        env={"HOROVOD_AUTOTUNE_LOG": str(log), "HOROVOD_FUSION_THRESHOLD": "1048576"},
    )
    assert log.exists() and log.stat().st_size > 0  # written by Horovod's autotuner: HOROVOD_AUTOTUNE=1
    warning = (
        "sets HOROVOD_FUSION_THRESHOLD=8388608, but the environment has HOROVOD_FUSION_THRESHOLD=1048576"
    )
    assert proc.stderr.count(warning) == 1, proc.stderr  # said once, by rank 0


def test_fp16_scaler_with_horovod_skips_the_same_steps_on_every_rank(tmp_path):
    """synchronize -> unscale -> clip -> step: an inf gradient on one rank makes every rank skip."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fp16_step_check.py")
    cmd = runner.under("gloo", 2, [sys.executable, script])
    proc = runner.run(cmd, timeout=180, env={"PYTHONPATH": ROOT}, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert results[0]["skipped"] == results[1]["skipped"] == results[0]["expected_skips"]
    for name in results[0]["weights"]:
        assert torch.equal(results[0]["weights"][name], results[1]["weights"][name]), name


def test_sample_config_with_training_options(tmp_path):
    sample = os.path.join(ROOT, "samples", "pedl_train_batch")
    proc, _ = launch(
        "mpi", 2, sample, tmp_path / "out", "--config", os.path.join(sample, "optimizations.yaml")
    )
    assert_ok(proc)
    assert "aggregation 2, bf16 autocast, clip L2 norm 5" in proc.stdout
    assert reports(tmp_path / "out", "validation")[-1]["metrics"]["validation_error"] < 0.2
    # StepLR(step_size=40) steps once per optimizer step (every 2 batches): the rate halves after batch 80.
    lrs = [e["metrics"]["lr"] for e in reports(tmp_path / "out", "training")]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05])
