"""PEDL's two trial APIs, LR schedulers, the global batch, checkpoint_policy and the `pedl` surface, in one
process (the launchers' side is in tests/integration/test_pedl_apis.py)."""

import json
import os

import pytest
import torch
from conftest import GOOD_CONFIG, GOOD_DATA, GOOD_MODEL_DEF, write_model_def

import harness
from harness import config, definition, distributed
from harness.api.lr_scheduler import LRScheduler
from harness.api.trial import BATCH_API
from harness.errors import HarnessError
from harness.output import checkpoint
from harness.train import loop

# GOOD_MODEL_DEF's model in PEDL's later API, without batch_size(): the global batch is a hyperparameter.
BATCH_API_DEF = """
import torch
from torch import nn
import pedl
from pedl.frameworks.pytorch import LRScheduler, PyTorchTrial


class Trial(PyTorchTrial):
    seen = []

    def build_model(self):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def train_batch(self, batch, model, epoch_idx, batch_idx):
        Trial.seen.append((epoch_idx, batch_idx))
        data, labels = batch
        return nn.functional.cross_entropy(model(data), labels)

    def evaluate_batch(self, batch, model):
        data, labels = batch
        output = model(data)
        return {
            "loss": nn.functional.cross_entropy(output, labels),
            "accuracy": (output.argmax(1) == labels).float().mean(),
        }
"""
BATCH_API_CONFIG = GOOD_CONFIG.replace("batch: 20", "global_batch_size: 20")


def train_local(directory, output, **kwargs):
    cfg = config.load_config(config.find_config_file(str(directory)))
    return loop.train(definition.load(str(directory), cfg.entrypoint), cfg, str(output), distributed.Local())


def reports(output, kind):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["type"] == kind]


def error_of(directory, output):
    with pytest.raises(HarnessError) as info:
        train_local(directory, output)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Which API, and the errors of neither


def test_train_batch_api_gives_the_same_numbers_as_the_losses_api(model_dir, tmp_path):
    write_model_def(model_dir)
    first = train_local(model_dir, tmp_path / "losses")
    other = write_model_def(tmp_path / "model2", model_def=BATCH_API_DEF, config=BATCH_API_CONFIG)
    later = train_local(other, tmp_path / "batch")
    assert later == pytest.approx(first, rel=1e-6)
    a, b = reports(tmp_path / "losses", "training"), reports(tmp_path / "batch", "training")
    assert [e["metrics"]["loss"] for e in a] == pytest.approx([e["metrics"]["loss"] for e in b], rel=1e-6)


def test_epoch_and_batch_indices_are_global(model_dir, tmp_path):
    # 300 records / 20 = 15 batches an epoch; 20 batches: epoch 0 then 5 batches of epoch 1.
    write_model_def(
        model_dir, model_def=BATCH_API_DEF, config=BATCH_API_CONFIG.replace("{batches: 6}", "{batches: 20}")
    )
    model_def = definition.load(str(model_dir))
    model_def.trial_class.seen.clear()
    cfg = config.load_config(config.find_config_file(str(model_dir)))
    loop.train(model_def, cfg, str(tmp_path), distributed.Local())
    assert model_def.trial_class.seen == [(i // 15, i) for i in range(20)]


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (
            "    def evaluate_batch",
            "    def not_evaluate_batch",
            "the train_batch/evaluate_batch API lacks evaluate_batch() or evaluate_full_dataset(); "
            "the losses/validation_metrics API lacks losses(), validation_metrics()",
        ),
        (
            "    def optimizer(self, model):",
            "    def not_optimizer(self, model):",
            "the train_batch/evaluate_batch API lacks optimizer(); "
            "the losses/validation_metrics API lacks optimizer(),",
        ),
        (
            "    def evaluate_batch(self, batch, model):",
            "    def evaluate_full_dataset(self, data_loader, model):\n        return {}\n\n"
            "    def evaluate_batch(self, batch, model):",
            "defines both evaluate_batch() and evaluate_full_dataset(); keep one",
        ),
    ],
)
def test_incomplete_class_names_what_each_api_lacks(model_dir, tmp_path, old, new, expected):
    write_model_def(model_dir, model_def=BATCH_API_DEF.replace(old, new), config=BATCH_API_CONFIG)
    with pytest.raises(HarnessError) as info:
        definition.load(str(model_dir))
    assert expected in str(info.value)
    assert "class Trial" in str(info.value) and "model_def.py" in str(info.value)


def test_a_class_with_both_apis_uses_the_later_one(model_dir):
    both = BATCH_API_DEF + (
        "\n    def losses(self, predictions, labels):\n        raise AssertionError\n"
        "\n    def validation_metrics(self, predictions, labels, losses):\n        raise AssertionError\n"
    )
    write_model_def(model_dir, model_def=both, config=BATCH_API_CONFIG)
    assert definition.check_trial_class(definition.load(str(model_dir)).trial_class) == BATCH_API


@pytest.mark.parametrize(
    "returned, expected",
    [
        ("{'accuracy': 1.0}", "train_batch() returned a dict without the key 'loss' (keys: accuracy)"),
        ("[1.0]", "train_batch() returned a list at training batch 1; expected a scalar tensor or a dict"),
        ("model(batch[0])", "train_batch() returned a loss of shape (10, 10) at training batch 1"),
    ],
)
def test_bad_train_batch_results(model_dir, tmp_path, returned, expected):
    bad = BATCH_API_DEF.replace(
        "return nn.functional.cross_entropy(model(data), labels)", f"return {returned}"
    ).replace("data, labels = batch\n        return", "return")
    write_model_def(model_dir, model_def=bad, config=BATCH_API_CONFIG.replace("20", "10"))
    assert expected in error_of(model_dir, tmp_path)


def test_train_batch_dict_entries_are_training_metrics(model_dir, tmp_path):
    with_metrics = BATCH_API_DEF.replace(
        "return nn.functional.cross_entropy(model(data), labels)",
        "out = model(data)\n"
        "        return {'loss': nn.functional.cross_entropy(out, labels), 'error': 0.25, "
        "'acc': (out.argmax(1) == labels).float().mean()}",
    )
    write_model_def(model_dir, model_def=with_metrics, config=BATCH_API_CONFIG)
    train_local(model_dir, tmp_path)
    last = reports(tmp_path, "training")[-1]["metrics"]
    assert set(last) == {"loss", "error", "acc"} and last["error"] == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------------------
# The global batch


@pytest.mark.parametrize(
    "hparams, expected_batch",
    [("batch_size: 30", 30), ("global_batch_size: 12", 12), ("global_batch_size: 12\n  batch_size: 30", 12)],
)
def test_global_batch_from_hyperparameters(model_dir, tmp_path, hparams, expected_batch, capsys):
    write_model_def(model_dir, model_def=BATCH_API_DEF, config=GOOD_CONFIG.replace("batch: 20", hparams))
    train_local(model_dir, tmp_path)
    assert f"global batch {expected_batch}," in capsys.readouterr().out
    assert reports(tmp_path, "training")[-1]["records"] == 6 * expected_batch


def test_no_batch_size_anywhere_names_all_three_ways(model_dir, tmp_path):
    write_model_def(model_dir, model_def=BATCH_API_DEF, config=GOOD_CONFIG.replace("batch: 20", "other: 1"))
    message = error_of(model_dir, tmp_path)
    assert "define batch_size()" in message and "global_batch_size" in message and "batch_size" in message


def test_bad_batch_size_hyperparameter(model_dir, tmp_path):
    write_model_def(
        model_dir, model_def=BATCH_API_DEF, config=GOOD_CONFIG.replace("batch: 20", "batch_size: -4")
    )
    assert "the hyperparameter 'batch_size' is -4; expected a positive integer" in error_of(
        model_dir, tmp_path
    )


# ----------------------------------------------------------------------------------------------------------
# LR schedulers: the harness's learning rates, batch for batch, against a hand-written loop


def scheduler_def(mode_expr, manual_every=0):
    manual = (
        f"        if batch_idx % {manual_every} == {manual_every} - 1:\n            self.sched.step()\n"
        if manual_every
        else ""
    )
    return BATCH_API_DEF.replace(
        "    def train_batch(self, batch, model, epoch_idx, batch_idx):\n",
        "    def create_lr_scheduler(self, optimizer):\n"
        "        step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)\n"
        f"        self.sched = LRScheduler(step, {mode_expr})\n"
        "        return self.sched\n\n"
        "    def train_batch(self, batch, model, epoch_idx, batch_idx):\n" + manual,
    )


def hand_written_lrs(batches, per_epoch, mode, manual_every=0):
    """The learning rate each batch trains with, in a plain loop stepping the same scheduler."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    used = []
    for i in range(batches):
        if mode == "manual" and i % manual_every == manual_every - 1:
            sched.step()  # inside train_batch: before the optimizer's step
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        if mode == "batch":
            sched.step()
        if mode == "epoch" and (i + 1) % per_epoch == 0:
            sched.step()
    return used


@pytest.mark.parametrize(
    "mode, expr",
    [
        ("batch", "step_mode=LRScheduler.StepMode.STEP_EVERY_BATCH"),
        ("epoch", "step_mode=LRScheduler.StepMode.STEP_EVERY_EPOCH"),
        ("manual", "step_mode=LRScheduler.StepMode.MANUAL_STEP"),
        ("batch", "step_every_batch=True"),  # PEDL's earlier keywords
        ("epoch", "step_every_epoch=True"),
        ("manual", ""),
    ],
)
def test_step_modes_match_a_hand_written_loop(model_dir, tmp_path, mode, expr):
    # 300 records, global batch 60: 5 batches an epoch; 17 batches cross three epoch boundaries.
    cfg = BATCH_API_CONFIG.replace("global_batch_size: 20", "global_batch_size: 60")
    cfg = cfg.replace("{batches: 6}", "{batches: 17}").replace("scheduling_unit: 3", "scheduling_unit: 1")
    every = 3 if mode == "manual" else 0
    write_model_def(model_dir, model_def=scheduler_def(expr, manual_every=every), config=cfg)
    train_local(model_dir, tmp_path)
    lrs = [e["metrics"]["lr"] for e in reports(tmp_path, "training")]
    assert lrs == pytest.approx(hand_written_lrs(17, 5, mode, manual_every=every))
    assert len(set(lrs)) >= 2  # the scheduler did move


def test_stepping_a_harness_stepped_scheduler_is_an_error(model_dir, tmp_path):
    bad = scheduler_def("step_mode=LRScheduler.StepMode.STEP_EVERY_BATCH", manual_every=2)
    write_model_def(model_dir, model_def=bad, config=BATCH_API_CONFIG)
    with pytest.raises(HarnessError, match="its step mode is STEP_EVERY_BATCH: the harness steps it"):
        train_local(model_dir, tmp_path)


def test_lr_scheduler_argument_errors():
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 1)
    with pytest.raises(HarnessError, match="both set"):
        LRScheduler(sched, step_every_batch=True, step_every_epoch=True)
    with pytest.raises(HarnessError, match="is not one of LRScheduler.StepMode"):
        LRScheduler(sched, step_mode="batch")
    with pytest.raises(HarnessError, match="needs a torch LR scheduler"):
        LRScheduler(None, LRScheduler.StepMode.STEP_EVERY_BATCH)
    assert harness.LRScheduler is LRScheduler


def test_create_lr_scheduler_must_return_the_wrapper(model_dir, tmp_path):
    bad = scheduler_def("step_mode=LRScheduler.StepMode.STEP_EVERY_BATCH").replace(
        "        return self.sched\n", "        return step\n"
    )
    write_model_def(model_dir, model_def=bad, config=BATCH_API_CONFIG)
    assert "create_lr_scheduler() returned a StepLR; expected LRScheduler(" in error_of(model_dir, tmp_path)


@pytest.mark.parametrize("mode", ["STEP_EVERY_BATCH", "STEP_EVERY_EPOCH"])
def test_resume_mid_epoch_keeps_the_scheduler_exact(model_dir, tmp_path, mode):
    """Train 7 batches (mid-epoch), resume to 17, against 17 straight: same weights and learning rates."""
    cfg = BATCH_API_CONFIG.replace("global_batch_size: 20", "global_batch_size: 60")
    cfg = cfg.replace("scheduling_unit: 3", "scheduling_unit: 1")
    model = scheduler_def(f"step_mode=LRScheduler.StepMode.{mode}").replace(
        "lr=0.1)", "lr=0.1, momentum=0.9)"
    )
    write_model_def(model_dir, model_def=model, config=cfg.replace("{batches: 6}", "{batches: 17}"))
    train_local(model_dir, tmp_path / "straight")
    write_model_def(model_dir, model_def=model, config=cfg.replace("{batches: 6}", "{batches: 7}"))
    train_local(model_dir, tmp_path / "resumed")
    write_model_def(model_dir, model_def=model, config=cfg.replace("{batches: 6}", "{batches: 17}"))
    train_local(model_dir, tmp_path / "resumed")

    def final(output):
        return checkpoint.load_newest_valid(str(output / "checkpoints"))

    a, b = final(tmp_path / "straight"), final(tmp_path / "resumed")
    for name, tensor in a.model.items():
        assert torch.equal(tensor, b.model[name]), name
    assert a.trainer["step"] == b.trainer["step"]
    lrs = [[e["metrics"]["lr"] for e in reports(tmp_path / o, "training")] for o in ("straight", "resumed")]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) > 1


# ----------------------------------------------------------------------------------------------------------
# checkpoint_policy


@pytest.mark.parametrize("policy, expected", [("all", [6, 4, 2]), ("none", [6]), ("best", None)])
def test_checkpoint_policy(model_dir, tmp_path, policy, expected):
    cfg = GOOD_CONFIG.replace("{batches: 6}", "{batches: 6}\n  metric: loss") + (
        f"min_validation_period: {{batches: 2}}\ncheckpoint_policy: {policy}\n"
        "checkpoint_storage: {save_trial_latest: 10, save_trial_best: 0}\n"
    )
    write_model_def(model_dir, config=cfg)
    train_local(model_dir, tmp_path)
    kept = checkpoint.checkpoint_dirs(str(tmp_path / "checkpoints"))
    if expected is None:  # best: after each validation that improved the loss, and at the end
        losses = [e["metrics"]["loss"] for e in reports(tmp_path, "validation")]
        improved = [2 * (i + 1) for i, v in enumerate(losses) if v < min(losses[:i], default=float("inf"))]
        expected = sorted(set(improved) | {6}, reverse=True)
    assert kept == expected


# ----------------------------------------------------------------------------------------------------------
# The pedl surface


def test_pedl_getters_inside_a_run(model_dir, tmp_path):
    record = BATCH_API_DEF.replace(
        "    def build_model(self):\n",
        "    def build_model(self):\n"
        "        Trial.got = (pedl.get_data_config(), pedl.get_trial_seed(), pedl.get_hyperparameters(),\n"
        "                     pedl.get_experiment_config()['searcher']['max_length'])\n",
    )
    write_model_def(model_dir, model_def=record, config=BATCH_API_CONFIG + "data:\n  url: somewhere\n")
    model_def = definition.load(str(model_dir))
    cfg = config.load_config(config.find_config_file(str(model_dir)))
    loop.train(model_def, cfg, str(tmp_path), distributed.Local())
    assert model_def.trial_class.got == ({"url": "somewhere"}, 1, {"global_batch_size": 20}, {"batches": 6})


def test_unknown_pedl_names_are_refused_by_name():
    import pedl
    import pedl.frameworks.pytorch as pt

    with pytest.raises(HarnessError, match=r"pedl\.Experiment is not provided .*get_data_config"):
        pedl.Experiment  # noqa: B018
    assert not hasattr(pt, "Reducer")
    with pytest.raises(HarnessError, match=r"pedl\.frameworks\.pytorch\.Reducer is not provided"):
        pt.Reducer  # noqa: B018


@pytest.mark.parametrize(
    "line, named",
    [
        ("from pedl.frameworks.pytorch import Reducer", "pedl.frameworks.pytorch.Reducer"),
        ("from pedl.frameworks.keras import KerasTrial", "pedl.frameworks.keras"),
        ("import pedl.callback", "pedl.callback"),
    ],
)
def test_unsupported_pedl_imports_are_one_line(model_dir, line, named):
    write_model_def(model_dir, model_def=line + "\n" + BATCH_API_DEF, config=BATCH_API_CONFIG)
    with pytest.raises(HarnessError) as info:
        definition.load(str(model_dir))
    message = str(info.value)
    assert f"imports {named}, which this harness's pedl package does not provide" in message
    assert "model_def.py:1" in message and "pedl.frameworks.pytorch: DataLoader, LRScheduler" in message


def test_get_hyperparameter_and_data_dir_unchanged(model_dir, tmp_path):
    write_model_def(model_dir, data=GOOD_DATA)
    train_local(model_dir, tmp_path)
    assert harness.get_hyperparameter("batch") == 20
    assert GOOD_MODEL_DEF  # the seed API definition still trains (above)
