"""Using a trained model, in one process: `harness evaluate`, `harness.load_trial`, `harness export`."""

import json
import os
import shutil
import sys

import pytest
import runner
import torch
from conftest import FULL_DATASET_MODEL_DEF, GOOD_CONFIG, GOOD_DATA, GOOD_MODEL_DEF, write_model_def

import harness
from harness import config, definition, distributed
from harness.errors import HarnessError
from harness.output import checkpoint, provenance
from harness.results import evaluate
from harness.train import loop
from harness.train.report import _fmt

BIN = os.path.dirname(sys.executable)
# torch 2.13 deprecates TorchScript (torch.jit.load says so); exporting it is what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMI"))}

# A forward pass that torch.jit.script refuses (variable keyword arguments) but tracing handles.
UNSCRIPTABLE_MODEL_DEF = GOOD_MODEL_DEF.replace(
    "        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))",
    "        return Net()",
) + (
    "\n\nclass Net(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))\n\n"
    "    def forward(self, x, **options):\n"
    "        return self.body(x)\n"
)
BF16_CONFIG = GOOD_CONFIG + "optimizations: {mixed_precision: bf16}\n"


def harness_cli(*args, timeout=120):
    return runner.run(runner.harness(*args), timeout)


def train(directory, output):
    cfg = config.load_config(config.find_config_file(str(directory)))
    loop.train(definition.load(str(directory)), cfg, str(output), distributed.Local())
    return os.path.join(str(output), "checkpoints", "6")


def saved_metrics(ckpt):
    return json.load(open(os.path.join(ckpt, "state.json")))["validation_metrics"]


def validation_inputs():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images[300:400] / 16.0, dtype=torch.float32), torch.tensor(d.target[300:400])


def rewrite_state(ckpt, **changes):
    """Edit a checkpoint's state.json as an earlier harness would have written it, keeping it valid."""
    path = os.path.join(ckpt, "state.json")
    state = json.load(open(path))
    for key, value in changes.items():
        state.pop(key) if value is None else state.__setitem__(key, value)
    json.dump(state, open(path, "w"))
    manifest = json.load(open(os.path.join(ckpt, "manifest.json")))
    manifest["files"]["state.json"] = checkpoint.sha256_file(path)
    json.dump(manifest, open(os.path.join(ckpt, "manifest.json"), "w"))


@pytest.mark.parametrize(
    "model_def, config_text",
    [
        (GOOD_MODEL_DEF, GOOD_CONFIG),
        (GOOD_MODEL_DEF, BF16_CONFIG),
        (FULL_DATASET_MODEL_DEF, GOOD_CONFIG.replace("batch: 20", "global_batch_size: 20")),
    ],
    ids=["losses-api", "bf16", "evaluate_full_dataset"],
)
def test_evaluate_matches_the_last_validation_exactly(model_dir, tmp_path, model_def, config_text):
    write_model_def(model_dir, model_def=model_def, config=config_text)
    ckpt = train(model_dir, tmp_path / "out")
    before = sorted((p, os.path.getmtime(p)) for p in _files(tmp_path / "out"))
    proc = harness_cli("evaluate", model_dir, ckpt, "--output", tmp_path / "evals")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    expected = saved_metrics(ckpt)
    shown = "  ".join(f"{k} {_fmt(v)}" for k, v in expected.items())
    assert proc.stdout == f"[evaluation] checkpoint {ckpt} (batch 6)  {shown}\n"
    (record,) = [json.loads(line) for line in open(tmp_path / "evals" / "evaluations.jsonl")]
    assert record["type"] == "evaluation" and record["checkpoint"] == ckpt and record["batches"] == 6
    assert record["metrics"] == expected  # exactly: the same computation as training's validation
    assert sorted((p, os.path.getmtime(p)) for p in _files(tmp_path / "out")) == before  # untouched


def _files(root):
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def test_the_checkpoints_config_is_the_default_and_config_replaces_it(model_dir, tmp_path):
    """Trained with --config bf16.yaml (the model directory's config is fp32): evaluation reproduces the
    bf16 validation by default; --config fp32.yaml evaluates in fp32 (other numbers) and says so."""
    write_model_def(model_dir)
    bf16 = tmp_path / "bf16.yaml"
    bf16.write_text(BF16_CONFIG)
    loop.train(
        definition.load(str(model_dir)),
        config.load_config(str(bf16)),
        str(tmp_path / "out"),
        distributed.Local(),
    )
    ckpt = os.path.join(str(tmp_path / "out"), "checkpoints", "6")
    state = json.load(open(f"{ckpt}/state.json"))
    model_def = definition.load(str(model_dir))
    cfg, said = evaluate.effective_config(str(model_dir), None, ckpt, state)
    assert said == [] and cfg.training_options.precision == "bf16"
    assert evaluate.evaluate(model_def, cfg, ckpt, distributed.Local()) == saved_metrics(ckpt)
    fp32 = str(model_dir / "experiment.yaml")
    cfg, said = evaluate.effective_config(str(model_dir), fp32, ckpt, state)
    assert said == [f"{fp32}: mixed_precision O0 (trained with bf16)"]
    assert evaluate.evaluate(model_def, cfg, ckpt, distributed.Local())["loss"] != saved_metrics(ckpt)["loss"]


def test_the_checkpoints_hyperparameters_build_the_trial(model_dir, tmp_path):
    """A config whose hyperparameters differ from the checkpoint's: the checkpoint's win (said)."""
    write_model_def(model_dir)
    ckpt = train(model_dir, tmp_path / "out")
    changed = tmp_path / "changed.yaml"
    changed.write_text(GOOD_CONFIG.replace("batch: 20", "batch: 10\n  extra: 1"))
    proc = harness_cli("evaluate", model_dir, tmp_path / "out", "--config", changed)  # OUTPUT: its newest
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        f"harness: warning: {changed}: hyperparameters batch, extra differ from "
        f"checkpoint {ckpt}'s; evaluating with the checkpoint's (what the model was trained with)\n"
    )
    shown = "  ".join(f"{k} {_fmt(v)}" for k, v in saved_metrics(ckpt).items())
    assert proc.stdout == f"[evaluation] checkpoint {ckpt} (batch 6)  {shown}\n"


def test_a_checkpoint_can_be_named_by_latest_and_by_output(model_dir, tmp_path):
    write_model_def(model_dir)
    ckpt = train(model_dir, tmp_path / "out")
    for name in ("out", "out/checkpoints", "out/checkpoints/latest", "out/checkpoints/6"):
        assert evaluate.find_checkpoint(str(tmp_path / name)) == ckpt


def test_load_trial_predicts_as_the_checkpoint_validated(model_dir, tmp_path):
    write_model_def(model_dir)
    ckpt = train(model_dir, tmp_path / "out")
    trial, model = harness.load_trial(ckpt)
    assert type(trial).__name__ == "Trial" and not model.training
    assert next(model.parameters()).device == torch.device("cpu")
    assert harness.get_hyperparameter("batch") == 20  # the trial's context is the checkpoint's
    x, y = validation_inputs()
    with torch.no_grad():
        predictions = model(x)
    metrics = trial.validation_metrics(predictions, y, trial.losses(predictions, y))
    for name, value in saved_metrics(ckpt).items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-6, abs=1e-7), name
    weights = torch.load(os.path.join(ckpt, "model.pt"), weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_load_trial_of_a_checkpoint_that_does_not_name_its_model_directory(model_dir, tmp_path):
    write_model_def(model_dir)
    ckpt = train(model_dir, tmp_path / "out")
    rewrite_state(ckpt, model_dir=None)  # as written before the harness recorded it
    with pytest.raises(HarnessError) as e:
        harness.load_trial(ckpt)
    assert str(e.value) == (
        f"checkpoint {ckpt} does not name its model definition; pass model_dir=DIR (the model definition "
        "directory)"
    )
    rewrite_state(ckpt, model_dir=str(tmp_path / "moved"))
    proc = harness_cli("export", ckpt, "--format", "state_dict", "--out", tmp_path / "w.pt")
    assert (proc.returncode, proc.stderr) == (
        2,
        f"harness: error: checkpoint {ckpt} names {tmp_path / 'moved'}, which does not exist; pass "
        "--model-dir DIR (the model definition directory)\n",
    )
    trial, model = harness.load_trial(ckpt, model_dir=model_dir)
    assert not model.training


def test_load_trial_imports_a_recorded_folder_only_with_the_code_that_trained(model_dir, tmp_path, capfd):
    """A checkpoint names its model definition folder; load_trial imports it only if it holds the .py files
    the checkpoint was trained with, belongs to this user and is not writable by all, and says so."""
    write_model_def(model_dir)
    ckpt = train(model_dir, tmp_path / "out")
    capfd.readouterr()
    harness.load_trial(ckpt)
    said = capfd.readouterr().err
    assert said == (
        f"harness: importing the model definition in {model_dir} (named by checkpoint {ckpt}; its 2 .py "
        "files are those it was trained with)\n"
    )
    planted = tmp_path / "planted"
    shutil.copytree(model_dir, planted)
    ran = tmp_path / "ran"
    with open(planted / "model_def.py", "a") as f:
        f.write(f"\nopen({str(ran)!r}, 'w').write('planted code ran')\n")
    ask = "; pass model_dir=DIR (the model definition directory)"

    def refused(**state):
        rewrite_state(ckpt, **state)
        with pytest.raises(HarnessError) as e:
            harness.load_trial(ckpt)
        assert not ran.exists()
        return str(e.value)

    assert refused(model_dir=str(planted)) == (
        f"checkpoint {ckpt} names {planted}, whose files differ from those it was trained with "
        f"(model_def.py){ask}"
    )
    forged = provenance.fingerprint(str(planted))  # an edited state.json can name the planted files' hashes
    os.chown(planted / "model_def.py", 65534, 65534)
    assert refused(model_files=forged) == (
        f"checkpoint {ckpt} names {planted}, which this user cannot vouch for ({planted / 'model_def.py'} "
        f"belongs to uid 65534){ask}"
    )
    os.chown(planted / "model_def.py", os.getuid(), os.getgid())
    os.chmod(planted, 0o777)
    assert refused().endswith(f"({planted} is writable by every user){ask}")
    assert refused(model_files=None) == (
        f"checkpoint {ckpt} names {planted} but records no hashes of its files (written before they were "
        f"recorded): which code it ran cannot be checked{ask}"
    )


@pytest.mark.parametrize("how", ["script", "trace"])
def test_export_round_trips(model_dir, tmp_path, how):
    write_model_def(model_dir, model_def=GOOD_MODEL_DEF if how == "script" else UNSCRIPTABLE_MODEL_DEF)
    ckpt = train(model_dir, tmp_path / "out")
    _, model = harness.load_trial(ckpt)
    x, _ = validation_inputs()
    with torch.no_grad():
        expected = model(x)

    proc = harness_cli("export", ckpt, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'm.pt'}\n"
    traced = "torch.jit.script failed (" in proc.stderr
    assert traced == (how == "trace"), proc.stderr
    assert torch.equal(torch.jit.load(str(tmp_path / "m.pt"))(x), expected)

    proc = harness_cli("export", tmp_path / "out", "--format", "state_dict", "--out", tmp_path / "w.pt")
    assert proc.returncode == 0 and proc.stdout == f"{tmp_path / 'w.pt'}\n", proc.stderr
    fresh = definition.load(str(model_dir)).trial_class().build_model({})
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)


def test_export_that_cannot_script_nor_trace_is_one_line(model_dir, tmp_path):
    # The output is an object of the model's own: neither scripted nor traced.
    model = (
        UNSCRIPTABLE_MODEL_DEF.replace("return self.body(x)", "return Logits(self.body(x))")
        .replace("cross_entropy(predictions,", "cross_entropy(predictions.value,")
        .replace("(predictions.argmax(1)", "(predictions.value.argmax(1)")
    )
    model += "\n\nclass Logits:\n    def __init__(self, value):\n        self.value = value\n"
    write_model_def(model_dir, model_def=model)
    ckpt = train(model_dir, tmp_path / "out")
    proc = harness_cli("export", ckpt, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert proc.returncode == 2
    said, line = proc.stderr.strip().split("\n")  # which code it imported, then the error's one line
    assert said.startswith(f"harness: importing the model definition in {model_dir} (named by checkpoint")
    assert line.startswith("harness: error: cannot export as torchscript: torch.jit.script ")
    assert "; torch.jit.trace with the first validation batch's input failed (" in line
    assert not (tmp_path / "m.pt").exists()


def test_errors_are_one_line_exit_2(model_dir, tmp_path):
    write_model_def(model_dir)
    ckpt = train(model_dir, tmp_path / "out")
    missing = tmp_path / "out" / "checkpoints" / "7"
    proc = harness_cli("evaluate", model_dir, missing)
    assert (proc.returncode, proc.stderr) == (2, f"harness: error: checkpoint {missing} does not exist\n")

    other = write_model_def(tmp_path / "other", model_def=GOOD_MODEL_DEF.replace("32", "48"))
    proc = harness_cli("evaluate", other, ckpt)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"harness: error: cannot load {ckpt}: the model does not fit its weights: 1.weight has shape "
        "(48, 64), the checkpoint's (32, 64) (and 2 more differences); is "
        f"{other} the model definition it was trained from?\n"
    )
    proc = harness_cli(
        "export", ckpt, "--format", "state_dict", "--out", tmp_path / "w.pt", "--model-dir", other
    )
    assert proc.returncode == 2 and proc.stderr.startswith(f"harness: error: cannot load {ckpt}: ")

    proc = harness_cli("evaluate", tmp_path / "nowhere", ckpt)
    assert proc.returncode == 2
    assert (
        proc.stderr == f"harness: error: model definition directory {tmp_path / 'nowhere'} does not exist\n"
    )

    with open(os.path.join(ckpt, "model.pt"), "r+b") as f:
        f.truncate(100)
    proc = harness_cli("evaluate", model_dir, ckpt)
    assert proc.returncode == 2
    assert (
        proc.stderr == f"harness: error: checkpoint {ckpt} is corrupt: model.pt does not match its checksum\n"
    )


def test_a_data_set_without_validation_loader_is_one_line(model_dir, tmp_path):
    write_model_def(model_dir)
    ckpt = train(model_dir, tmp_path / "out")
    data = GOOD_DATA.replace("harness.DataLoader(val, batch_size=16)", "None")
    write_model_def(model_dir, data=data)
    proc = harness_cli("evaluate", model_dir, ckpt)
    assert proc.returncode == 2
    assert proc.stderr == (
        "harness: error: make_data_loaders() returned no validation loader (None): nothing to evaluate\n"
    )
