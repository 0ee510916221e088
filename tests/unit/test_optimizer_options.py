"""Training options in one process: the config's two spellings, and what OptimizerStep does with them."""

import copy

import pytest
import runner
import torch
from conftest import GOOD_CONFIG, write_model_def

from harness.api.lr_scheduler import LRScheduler, StepMode
from harness.config import parse_config
from harness.config.optimizations import TrainingOptions, check_device, horovod_environment
from harness.errors import HarnessError
from harness.train.optimizer_step import OptimizerStep

# --- the config -------------------------------------------------------------------------------------------


def test_both_spellings_give_the_same_options():
    pedl = parse_config(
        {"hyperparameters": {"aggregation_frequency": 4, "clip_grad_l2_norm": 1, "amp": "O1"}}
    )
    block = parse_config(
        {"optimizations": {"aggregation_frequency": 4, "clip_grad_l2_norm": 1.0, "mixed_precision": "O1"}}
    )
    assert pedl.training_options == block.training_options
    assert pedl.training_options == TrainingOptions(
        aggregation_frequency=4, precision="fp16", clip_grad_l2_norm=1.0
    )
    assert pedl.hyperparameters["aggregation_frequency"] == 4  # still readable by the trial


def test_defaults_are_determineds_and_show_in_the_effective_config():
    cfg = parse_config({})
    assert cfg.training_options == TrainingOptions()
    opt = cfg.as_dict()["optimizations"]
    assert opt["aggregation_frequency"] == 1 and opt["mixed_precision"] == "O0"
    assert opt["average_aggregated_gradients"] is True and opt["gradient_compression"] is False


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"hyperparameters": {"aggregation_frequency": 2}, "optimizations": {"aggregation_frequency": 3}},
            "config keys 'hyperparameters.aggregation_frequency' (2) and "
            "'optimizations.aggregation_frequency' (3) set the same option differently; keep one",
        ),
        (
            {"hyperparameters": {"amp": "O1"}, "optimizations": {"mixed_precision": "bf16"}},
            "'hyperparameters.amp' ('O1') and 'optimizations.mixed_precision' ('bf16')",
        ),
        ({"optimizations": {"aggregation_frequency": 0}}, "expected an integer >= 1, got 0"),
        ({"hyperparameters": {"aggregation_frequency": 1.5}}, "expected an integer >= 1, got 1.5"),
        ({"hyperparameters": {"clip_grad_val": -1}}, "'hyperparameters.clip_grad_val': expected a positive"),
        ({"optimizations": {"clip_grad_l2_norm": 0}}, "expected a positive number, got 0"),
        ({"hyperparameters": {"clip_grad_val": 1, "clip_grad_l2_norm": 2}}, "both clip_grad_l2_norm and"),
        ({"optimizations": {"mixed_precision": "O3"}}, "'O3' (apex's pure fp16 weights"),
        ({"hyperparameters": {"amp": "O4"}}, "'hyperparameters.amp': expected one of O0, O1, O2, O3, fp16"),
        ({"optimizations": {"gradient_compression": "yes"}}, "expected true or false, got 'yes'"),
        ({"optimizations": {"tensor_fusion_threshold": -1}}, "expected a number >= 0, got -1"),
        ({"optimizations": {"mixed_precison": "bf16"}}, "did you mean 'mixed_precision'?"),
    ],
)
def test_bad_options_are_one_line_naming_the_key(raw, message):
    with pytest.raises(HarnessError) as e:
        parse_config(raw, "exp.yaml")
    assert str(e.value).startswith("exp.yaml: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_agreeing_spellings_are_fine():
    cfg = parse_config({"hyperparameters": {"amp": "O2"}, "optimizations": {"mixed_precision": "fp16"}})
    assert cfg.training_options.precision == "fp16"
    assert parse_config({"hyperparameters": {"amp": True}}).training_options.precision == "fp16"
    assert parse_config({"optimizations": {"mixed_precision": "bf16"}}).training_options.precision == "bf16"


def test_options_that_change_nothing_here_are_said():
    cfg = parse_config({"optimizations": {"average_training_metrics": False}}, "exp.yaml")
    assert cfg.warnings == [
        "exp.yaml: optimizations.average_training_metrics: false is ignored: training metrics are always "
        "averaged over all ranks here"
    ]


def test_fp16_is_refused_off_cuda():
    with pytest.raises(HarnessError, match="fp16 autocast with a loss scaler is for CUDA GPUs"):
        check_device(TrainingOptions(precision="fp16"), torch.device("cpu"))
    check_device(TrainingOptions(precision="bf16"), torch.device("cpu"))
    check_device(TrainingOptions(precision="fp16"), torch.device("cuda", 0))


def test_horovod_tuning_reaches_the_environment_and_yours_wins():
    opt = parse_config(
        {"optimizations": {"tensor_fusion_threshold": 32, "tensor_fusion_cycle_time": 2.5}}
    ).optimizations
    env = {}
    assert horovod_environment(opt, env) == []
    assert env == {"HOROVOD_FUSION_THRESHOLD": str(32 * 1024 * 1024), "HOROVOD_CYCLE_TIME": "2.5"}
    env = {"HOROVOD_FUSION_THRESHOLD": "1048576", "HOROVOD_CYCLE_TIME": "2.5"}
    (conflict,) = horovod_environment(opt, env)
    assert env["HOROVOD_FUSION_THRESHOLD"] == "1048576"
    assert "optimizations.tensor_fusion_threshold (32.0) sets HOROVOD_FUSION_THRESHOLD=33554432" in conflict
    assert conflict.endswith("the environment has HOROVOD_FUSION_THRESHOLD=1048576; the environment wins")
    auto = parse_config({"optimizations": {"auto_tune_tensor_fusion": True}}).optimizations
    env = {}
    horovod_environment(auto, env)
    assert env == {"HOROVOD_AUTOTUNE": "1"}


# --- OptimizerStep ----------------------------------------------------------------------------------------

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))


def make(options=None, momentum=0.9, scheduler=None, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    sched = scheduler(opt) if scheduler else None
    return model, OptimizerStep(opt, sched, options, torch.device(device))


def train(model, step, batch, n, start=0):
    for i in range(start, start + n):
        x, y = X[(i * batch) % 64 :][:batch], Y[(i * batch) % 64 :][:batch]
        with step.forward():
            loss = torch.nn.functional.mse_loss(model(x), y)
        step.step(loss)


def test_aggregation_of_two_batches_equals_one_batch_twice_as_large():
    big, step_big = make()
    train(big, step_big, 16, 8)
    small, step_small = make(TrainingOptions(aggregation_frequency=2))
    train(small, step_small, 8, 16)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert step_small.pending == 0


def test_unaveraged_aggregation_sums_the_gradients():
    avg, s1 = make(TrainingOptions(aggregation_frequency=2), momentum=0)
    summed, s2 = make(
        TrainingOptions(aggregation_frequency=2, average_aggregated_gradients=False), momentum=0
    )
    w0 = avg.weight.detach().clone()
    train(avg, s1, 8, 2)
    train(summed, s2, 8, 2)
    torch.testing.assert_close(summed.weight - w0, 2 * (avg.weight - w0))


def test_the_optimizer_steps_only_at_the_end_of_a_window():
    model, step = make(TrainingOptions(aggregation_frequency=3))
    w0 = model.weight.detach().clone()
    train(model, step, 8, 2)
    assert torch.equal(model.weight, w0) and step.pending == 2 and model.weight.grad is not None
    train(model, step, 8, 1, start=2)
    assert not torch.equal(model.weight, w0) and step.pending == 0 and model.weight.grad is None


@pytest.mark.parametrize("kind", ["l2", "val"])
def test_clipping_acts_on_the_averaged_gradient(kind):
    options = TrainingOptions(
        aggregation_frequency=2,
        clip_grad_l2_norm=0.05 if kind == "l2" else None,
        clip_grad_val=0.01 if kind == "val" else None,
    )
    model, step = make(options, momentum=0)
    w0 = [p.detach().clone() for p in model.parameters()]
    train(model, step, 8, 2)
    # By hand: the mean gradient of the two batches, clipped, one SGD step.
    ref, _ = make(momentum=0)
    loss = sum(torch.nn.functional.mse_loss(ref(X[i * 8 :][:8]), Y[i * 8 :][:8]) for i in range(2)) / 2
    loss.backward()
    params = list(ref.parameters())
    if kind == "l2":
        torch.nn.utils.clip_grad_norm_(params, 0.05)
    else:
        torch.nn.utils.clip_grad_value_(params, 0.01)
    for p, before, r in zip(model.parameters(), w0, params):
        torch.testing.assert_close(p, before - 0.1 * r.grad)
    unclipped, s = make(TrainingOptions(aggregation_frequency=2), momentum=0)
    train(unclipped, s, 8, 2)
    assert not torch.allclose(unclipped.weight, model.weight)  # the clip did bite


def test_a_step_scheduler_steps_once_per_window():
    model, step = make(
        TrainingOptions(aggregation_frequency=2),
        scheduler=lambda o: LRScheduler(
            torch.optim.lr_scheduler.StepLR(o, 1, 0.5), StepMode.STEP_EVERY_BATCH
        ),
    )
    train(model, step, 8, 4)
    assert step.report()["lr"] == pytest.approx(0.05)  # two optimizer steps: 0.1, then 0.05
    assert step.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_bf16_autocast_runs_the_forward_pass_in_bf16_on_cpu():
    model, step = make(TrainingOptions(precision="bf16"))
    with step.forward():
        assert model(X[:4]).dtype == torch.bfloat16
    assert model(X[:4]).dtype == torch.float32
    assert step.scaler is None


def test_fp16_skipped_steps_are_counted_and_the_scaler_state_is_kept():
    # The GradScaler on CPU (the harness offers fp16 on CUDA only; the mechanism is the same).
    model, step = make(TrainingOptions(precision="fp16"))
    train(model, step, 8, 2)  # (fp16 gradients may overflow at the first scale of 65536: skipped too)
    before = step.report()
    assert before["loss_scale"] == step.scaler.get_scale() and before["skipped_steps"] == step.skipped
    w = model.weight.detach().clone()
    with step.forward():
        loss = model(X[:8]).sum() * float("inf")
    step.step(loss)
    assert torch.equal(model.weight, w)  # skipped, and the loss scale halved
    assert step.report() == {"loss_scale": before["loss_scale"] / 2, "skipped_steps": 1}
    assert step.report()["skipped_steps"] == 0  # per report window
    total = step.skipped
    _, again = make(TrainingOptions(precision="fp16"))
    again.load_state_dict(copy.deepcopy(step.state_dict()))
    assert again.scaler.get_scale() == before["loss_scale"] / 2 and again.skipped == total


def test_resume_in_the_middle_of_a_window_is_exact():
    options = TrainingOptions(aggregation_frequency=3, clip_grad_l2_norm=0.5)
    straight, s = make(options)
    train(straight, s, 8, 7)
    first, s1 = make(options)
    train(first, s1, 8, 4)  # one window and one batch of the next
    state = copy.deepcopy(
        {"model": first.state_dict(), "opt": s1.optimizer.state_dict(), "step": s1.state_dict()}
    )
    grads = s1.local_gradients()
    assert state["step"]["pending"] == 1 and grads is not None
    resumed, s2 = make(options)
    resumed.load_state_dict(state["model"])
    s2.optimizer.load_state_dict(state["opt"])
    s2.load_state_dict(state["step"], grads)
    train(resumed, s2, 8, 3, start=4)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    _, other = make(TrainingOptions(aggregation_frequency=2))
    with pytest.raises(HarnessError, match="middle of an aggregation window"):
        other.load_state_dict(state["step"], grads)


# --- the command ------------------------------------------------------------------------------------------


@pytest.mark.integration  # starts the harness as its own process
@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "optimizations: {mixed_precision: O1}\n",
            "harness: error: config key 'optimizations.mixed_precision' (or hyperparameter 'amp'): fp16 "
            "autocast with a loss scaler is for CUDA GPUs, and this rank trains on cpu",
        ),
        ("optimizations: {mixed_precision: O3}\n", "'O3' (apex's pure fp16 weights"),
    ],
)
def test_impossible_options_end_the_run_before_training(tmp_path, extra, message):
    model_dir = tmp_path / "model"
    write_model_def(model_dir, config=GOOD_CONFIG + extra)
    proc = runner.run(runner.harness(model_dir, "--output", tmp_path / "out"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "[training" not in proc.stdout
    assert not (tmp_path / "out" / "checkpoints").exists()
