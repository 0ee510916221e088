"""Determined's trial API (a trial made with a context) in one process: the same numbers as PEDL's APIs,
several models and optimizers, clipping and aggregation through step_optimizer, reducers, callbacks,
schedulers, resume, the 0.12 form, the `determined` package's surface and every refusal as one line (the
launchers' side is in tests/integration/test_determined_api.py)."""

import json
import os
import sys

import pytest
import torch
from conftest import GOOD_CONFIG, GOOD_MODEL_DEF, write_model_def
from determined_defs import CONTEXT_DEF, CONTEXT_HEAD, GAN_DEF

from harness import config, definition, distributed
from harness.errors import HarnessError
from harness.output import checkpoint
from harness.results.evaluate import load_trial
from harness.train import loop

CONTEXT_CONFIG = GOOD_CONFIG.replace("batch: 20", "global_batch_size: 20")


def train_local(directory, output):
    cfg = config.load_config(config.find_config_file(str(directory)))
    model_def = definition.load(str(directory), cfg.entrypoint)
    return loop.train(model_def, cfg, str(output), distributed.Local())


def reports(output, kind):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["type"] == kind]


def losses(output):
    return [e["metrics"]["loss"] for e in reports(output, "training")]


def error_of(directory, output):
    with pytest.raises(HarnessError) as info:
        train_local(directory, output)
    assert "\n" not in str(info.value)
    return str(info.value)


def context_def(tmp_path, name, model_def, config=CONTEXT_CONFIG):
    return write_model_def(tmp_path / name, model_def=model_def, data=None, config=config)


@pytest.fixture(autouse=True)
def _forget_modules(forget_modules):
    """Each test's model definitions are imported afresh (tests/conftest.py)."""
    yield


# ----------------------------------------------------------------------------------------------------------
# The same numbers as PEDL's APIs


def test_context_api_gives_the_same_numbers_as_the_losses_api(tmp_path):
    reference = write_model_def(tmp_path / "losses")
    first = train_local(reference, tmp_path / "out-losses")
    later = train_local(context_def(tmp_path, "context", CONTEXT_DEF), tmp_path / "out-context")
    assert later == pytest.approx(first, rel=1e-6)
    assert losses(tmp_path / "out-context") == pytest.approx(losses(tmp_path / "out-losses"), rel=1e-6)


AGGREGATION = "optimizations:\n  aggregation_frequency: 3\n"


@pytest.mark.parametrize(
    "extra, clip_call",
    [
        (
            "optimizations:\n  clip_grad_l2_norm: 0.05\n",
            "lambda ps: nn.utils.clip_grad_norm_(ps, 0.05)",
        ),
        (
            "optimizations:\n  clip_grad_val: 0.001\n",
            "lambda ps: nn.utils.clip_grad_value_(ps, 0.001)",
        ),
        (AGGREGATION, None),
    ],
)
def test_step_optimizer_clipping_and_aggregation_match_the_config_driven_step(tmp_path, extra, clip_call):
    """The losses API with the config's clipping (or aggregation) against step_optimizer(clip_grads=...)
    (or the same config): the same losses, so clipping acts after synchronize/unscale/averaging as there."""
    reference = write_model_def(
        tmp_path / "losses", config=GOOD_CONFIG.replace("{batches: 6}", "{batches: 9}") + extra
    )
    train_local(reference, tmp_path / "out-losses")
    model_def = CONTEXT_DEF
    config_text = CONTEXT_CONFIG.replace("{batches: 6}", "{batches: 9}")
    if clip_call:
        model_def = model_def.replace(
            "step_optimizer(self.opt)", f"step_optimizer(self.opt, clip_grads={clip_call})"
        )
    else:
        config_text += extra
    train_local(context_def(tmp_path, "context", model_def, config_text), tmp_path / "out-context")
    assert losses(tmp_path / "out-context") == pytest.approx(losses(tmp_path / "out-losses"), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Two models, two optimizers, schedulers, a callback with state, a reducer; resume

# 300 records / 20 = 15 batches an epoch; 24 batches, reports every 5; validations at 10, 20 and 24 (the end).
GAN_CONFIG = (
    CONTEXT_CONFIG.replace("{batches: 6}", "{batches: 24}").replace("unit: 3", "unit: 5")
    + "min_validation_period: {batches: 10}\n"
)


def test_two_models_two_optimizers_schedulers_callbacks_and_a_reducer(tmp_path):
    directory = context_def(tmp_path, "gan", GAN_DEF, GAN_CONFIG)
    result = train_local(directory, tmp_path / "out")
    assert result["exact_accuracy"] == pytest.approx(result["accuracy"], rel=1e-9)  # both exact over 100
    training = reports(tmp_path / "out", "training")
    assert {"loss_a", "loss_b"} <= set(training[0]["metrics"]) and "loss" not in training[0]["metrics"]
    assert all(0 <= e["metrics"]["exact_accuracy"] <= 1 for e in training)  # the reducer, per report window
    loaded = checkpoint.load_newest_valid(str(tmp_path / "out" / "checkpoints"))
    ckpt = loaded.path
    assert set(loaded.optimizer) == {"optimizers"} and len(loaded.optimizer["optimizers"]) == 2
    step = loaded.trainer["step"]
    assert [s["last_epoch"] for s in step["lr_schedulers"]] == [24, 1]  # every batch; one epoch ended
    assert step["callbacks"]["counter"] == {
        "training_start": 1,
        "epoch_start": 2,
        "epoch_end": 1,
        "validation_start": 3,
        "validation_end": 3,
    }
    assert set(loaded.model) == {k for k in loaded.model if k.startswith(("0.", "1."))}  # a ModuleList
    trial, model = load_trial(ckpt, directory)
    assert isinstance(model, torch.nn.ModuleList) and trial.a is model[0] and trial.b is model[1]


def test_resume_with_two_optimizers_schedulers_and_callback_state_is_exact(tmp_path):
    """24 batches straight, against 10 (mid-epoch, where the straight run validates too: a validation
    draws from the RNG) then resumed to 24: the same weights of both models, optimizer states, schedulers,
    callback state; model a trains with dropout, so the RNG is restored exactly too."""
    directory = context_def(tmp_path, "gan", GAN_DEF, GAN_CONFIG)
    straight = train_local(directory, tmp_path / "straight")
    cut = context_def(tmp_path, "cut", GAN_DEF, GAN_CONFIG.replace("{batches: 24}", "{batches: 10}"))
    train_local(cut, tmp_path / "resumed")
    resumed = train_local(directory, tmp_path / "resumed")
    assert resumed == straight
    a = checkpoint.load_newest_valid(str(tmp_path / "straight" / "checkpoints"))
    b = checkpoint.load_newest_valid(str(tmp_path / "resumed" / "checkpoints"))
    for name, tensor in a.model.items():
        assert torch.equal(tensor, b.model[name]), name
    counted = b.trainer["step"]["callbacks"]["counter"]
    assert counted.pop("training_start") == 2  # once per run, as Determined did: it started twice
    assert a.trainer["step"]["callbacks"]["counter"].pop("training_start") == 1
    assert a.trainer["step"] == b.trainer["step"]  # schedulers, callback state (restored, counted on)
    for x, y in zip(a.optimizer["optimizers"], b.optimizer["optimizers"]):
        for key, state in x["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(y["state"][key][name])), name


# ----------------------------------------------------------------------------------------------------------
# Determined 0.12's form, signatures, getters


OLD_FORM_DEF = (
    CONTEXT_HEAD
    + """

class Trial(PyTorchTrial):
    def __init__(self, context):
        self.context = context
        self.train_set, self.val_set = datasets()

    def build_model(self):
        return net()

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def build_training_data_loader(self):
        return DataLoader(self.train_set, batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

    def build_validation_data_loader(self):
        return DataLoader(self.val_set, batch_size=16)

    def train_batch(self, batch, model, epoch_idx, batch_idx):
        data, labels = batch
        return {"loss": nn.functional.cross_entropy(model(data), labels)}

    def evaluate_batch(self, batch, model):
        data, labels = batch
        output = model(data)
        return {
            "loss": nn.functional.cross_entropy(output, labels),
            "accuracy": (output.argmax(1) == labels).float().mean(),
        }
"""
)


def test_the_0_12_form_trains_like_the_losses_api(tmp_path):
    reference = write_model_def(tmp_path / "losses")
    first = train_local(reference, tmp_path / "out-losses")
    later = train_local(context_def(tmp_path, "old", OLD_FORM_DEF), tmp_path / "out-old")
    assert later == pytest.approx(first, rel=1e-6)


def test_evaluate_batch_signatures_and_getters(tmp_path):
    model_def = CONTEXT_DEF.replace(
        "def evaluate_batch(self, batch):", "def evaluate_batch(self, batch, batch_idx):"
    )
    model_def = model_def.replace(
        "        self.train_set, self.val_set = datasets()",
        "        self.train_set, self.val_set = datasets()\n"
        "        import determined\n"
        "        assert determined.get_cluster_info() is None\n"
        "        assert context.get_per_slot_batch_size() == context.get_global_batch_size() == 20\n"
        "        assert context.distributed.get_rank() == 0 and context.distributed.get_size() == 1\n"
        "        assert context.get_hparams() == {'global_batch_size': 20}\n"
        "        assert context.get_trial_seed() == 1 and context.get_data_config() == {}\n"
        "        assert context.to_device(torch.ones(2)).device.type == 'cpu'",
    )
    model_def = model_def.replace(
        "        output = self.model(data)\n        return {",
        "        output = self.model(data)\n        assert isinstance(batch_idx, int)\n        return {",
    )
    result = train_local(context_def(tmp_path, "sig", model_def), tmp_path / "out")
    assert set(result) == {"loss", "accuracy"}


# ----------------------------------------------------------------------------------------------------------
# Refusals: one line naming the problem


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (
            "        self.model = context.wrap_model(net())",
            "        self.model = net()",
            "context.wrap_optimizer() called before context.wrap_model()",
        ),
        (
            "self.opt = context.wrap_optimizer(torch.optim.SGD(self.model.parameters(), lr=0.1))",
            "self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)",
            "model_def.py: Trial.__init__ wrapped no optimizer",
        ),
        (
            "torch.optim.SGD(self.model.parameters(), lr=0.1))",
            "torch.optim.SGD(list(self.model.parameters()) + [nn.Parameter(torch.ones(1))], lr=0.1))",
            "holds parameters of no model given to context.wrap_model()",
        ),
        (
            "        self.context.step_optimizer(self.opt)",
            "        self.context.step_optimizer(self.opt.__class__(self.model.parameters(), lr=0.1))",
            "an optimizer that context.wrap_optimizer() did not return",
        ),
        (
            "        self.train_set, self.val_set = datasets()",
            "        import determined\n        raise determined.InvalidHP('lr too large')",
            "Trial(context) raised InvalidHP: lr too large; the trial ends as invalid",
        ),
        (
            "        data, labels = batch\n        loss",
            "        import determined\n        raise determined.InvalidHP('diverged')\n"
            "        data, labels = batch\n        loss",
            "the trial raised InvalidHP: diverged; the trial ends as invalid",
        ),
        (
            "    def build_validation_data_loader(self):",
            "    def not_build_validation_data_loader(self):",
            "(Determined's PyTorchTrial) lacks build_validation_data_loader()",
        ),
        (
            "from determined.pytorch import DataLoader,",
            "from determined.pytorch import DeepSpeedTrial, DataLoader,",
            "imports determined.pytorch.DeepSpeedTrial, which this harness's determined package does not "
            "provide",
        ),
        (
            '        return {"loss": loss}',
            "        return [loss]",
            "train_batch() returned a list at training batch 1",
        ),
    ],
)
def test_refusals_are_one_line(tmp_path, old, new, expected):
    assert old in CONTEXT_DEF
    directory = context_def(tmp_path, "bad", CONTEXT_DEF.replace(old, new))
    assert expected in error_of(directory, tmp_path / "out")


def test_a_missing_global_batch_size_names_the_hyperparameter(tmp_path):
    directory = context_def(tmp_path, "nobatch", CONTEXT_DEF, GOOD_CONFIG.replace("batch: 20", "other: 1"))
    assert "global_batch_size" in error_of(directory, tmp_path / "out")


def test_the_harness_determined_package_wins_over_an_installed_one(tmp_path, monkeypatch):
    fake = tmp_path / "site" / "determined"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the real determined needs its cluster')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "determined" or m.startswith("determined.")]:
        monkeypatch.delitem(sys.modules, name)
    directory = context_def(tmp_path, "ok", CONTEXT_DEF)
    train_local(directory, tmp_path / "out")
    assert sys.modules["determined"].__file__.startswith(definition.COMPAT_DIR)


def test_pedl_trials_still_load_beside_the_determined_package(tmp_path):
    directory = write_model_def(tmp_path / "pedl", model_def=GOOD_MODEL_DEF)
    assert definition.load(directory).make_data_loaders is not None


@pytest.mark.parametrize(
    "entrypoint, expected",
    [
        ("python3 train.py", "a Determined Trainer script; run it as it is with `python train.py`"),
        (
            "python3 -m determined.launch.horovod --autohorovod --trial model_def:Trial",
            "around the trial class model_def:Trial: run it with `harness launch -np N MODEL_DIR",
        ),
    ],
)
def test_command_entrypoints_say_how_to_run_them(tmp_path, entrypoint, expected):
    path = tmp_path / "const.yaml"
    path.write_text(CONTEXT_CONFIG + f"entrypoint: {entrypoint}\n")
    with pytest.raises(HarnessError) as info:
        config.load_config(str(path))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_perform_initial_validation_validates_the_untrained_model_at_batch_0(tmp_path):
    directory = context_def(
        tmp_path, "init", CONTEXT_DEF, CONTEXT_CONFIG + "perform_initial_validation: true\n"
    )
    train_local(directory, tmp_path / "out")
    validations = reports(tmp_path / "out", "validation")
    assert [e["batches"] for e in validations] == [0, 6]
    assert validations[0]["metrics"]["accuracy"] < validations[1]["metrics"]["accuracy"]
    # A resumed run does not validate at its start again.
    longer = context_def(tmp_path, "init", CONTEXT_DEF, CONTEXT_CONFIG.replace("{batches: 6}", "{batches: 9}")
                         + "perform_initial_validation: true\n")  # fmt: skip
    train_local(longer, tmp_path / "out")
    assert [e["batches"] for e in reports(tmp_path / "out", "validation")] == [0, 6, 9]


def test_torch_writer_logs_into_the_output_folder(tmp_path, monkeypatch):
    model_def = CONTEXT_DEF.replace(
        "        self.context = context\n",
        "        self.context = context\n"
        "        from determined.tensorboard.metric_writers.pytorch import TorchWriter\n"
        "        self.logger = TorchWriter()\n",
        1,
    ).replace(
        '        return {"loss": loss}',
        '        self.logger.writer.add_scalar("my_loss", loss.item(), batch_idx)\n'
        '        return {"loss": loss}',
    )
    monkeypatch.setenv("HARNESS_OUTPUT_DIR", str(tmp_path / "out"))
    train_local(context_def(tmp_path, "writer", model_def), tmp_path / "out")
    events = os.listdir(tmp_path / "out" / "tensorboard" / "trial")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")


def test_determined_spellings_of_entrypoint_and_periods(tmp_path):
    path = tmp_path / "const.yaml"
    path.write_text(
        CONTEXT_CONFIG + "min_validation_period: {batches: 0}\nmin_checkpoint_period: {epochs: 0}\n"
    )
    cfg = config.load_config(str(path))
    assert cfg.min_validation_period is None and cfg.min_checkpoint_period is None  # 0: none, as Determined
    path.write_text(CONTEXT_CONFIG + "entrypoint: [python3, -m, determined.launch.deepspeed, --trial, m:T]\n")
    with pytest.raises(HarnessError, match="DeepSpeed trials"):
        config.load_config(str(path))


def test_the_determined_package_exports_what_it_lists():
    definition.use_compat_packages()
    import determined
    import determined.pytorch

    assert sorted(determined.pytorch.__all__) == sorted(determined.SUPPORTED["determined.pytorch"])
    assert all(hasattr(determined.pytorch, name) for name in determined.pytorch.__all__)
    assert sorted(determined.__all__) == sorted(determined.SUPPORTED["determined"])


def test_checkpoint_callbacks_see_the_saved_and_loaded_state(tmp_path):
    model_def = CONTEXT_DEF.replace(
        "class Trial(PyTorchTrial):",
        "SEEN = []\n\n\nclass Hooks(PyTorchCallback):\n"
        "    def on_checkpoint_save_start(self, checkpoint):\n"
        "        SEEN.append(('save', checkpoint['batches']))\n\n"
        "    def on_checkpoint_load_start(self, checkpoint):\n"
        "        SEEN.append(('load', checkpoint['batches']))\n\n\n"
        "class Trial(PyTorchTrial):\n"
        "    def build_callbacks(self):\n"
        "        return {'hooks': Hooks()}\n",
    )
    directory = context_def(tmp_path, "hooks", model_def)
    train_local(directory, tmp_path / "out")
    longer = context_def(tmp_path, "hooks", model_def, CONTEXT_CONFIG.replace("{batches: 6}", "{batches: 9}"))
    train_local(longer, tmp_path / "out")
    assert sys.modules["model_def"].SEEN == [("save", 6), ("load", 6), ("save", 9)]


def test_configure_apex_amp_on_a_cpu_is_one_line(tmp_path):
    model_def = CONTEXT_DEF.replace(
        "        self.train_set, self.val_set = datasets()",
        "        context.configure_apex_amp(self.model, self.opt, opt_level='O1')\n"
        "        self.train_set, self.val_set = datasets()",
    )
    message = error_of(context_def(tmp_path, "apex", model_def), tmp_path / "out")
    assert "context.configure_apex_amp(): fp16 with a loss scaler" in message and "trains on cpu" in message
