"""Model-definition discovery, PEDL compatibility and each bad-input message, in one process."""

import json
import os

import pytest
from conftest import GOOD_CONFIG, GOOD_DATA, GOOD_MODEL_DEF, SAMPLES, write_model_def

from harness import config, definition, distributed
from harness.errors import HarnessError
from harness.train import loop


def train_local(directory, output):
    """What `harness DIR` does in one process, minus the exit handling."""
    cfg = config.load_config(config.find_config_file(str(directory)))
    model_def = definition.load(str(directory), cfg.entrypoint)
    return loop.train(model_def, cfg, str(output), distributed.Local())


def error_of(directory, output):
    with pytest.raises(HarnessError) as info:
        train_local(directory, output)
    message = str(info.value)
    assert "\n" not in message, "an error is one line"
    return message


def test_good_definition_trains_and_writes_metrics(model_dir, tmp_path):
    write_model_def(model_dir)
    result = train_local(model_dir, tmp_path / "out")
    assert 0.0 <= result["accuracy"] <= 1.0
    lines = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert [e["type"] for e in lines] == ["training", "training", "validation"]
    assert [e["batches"] for e in lines] == [3, 6, 6]
    assert lines[-1]["records"] == 6 * 20
    assert os.path.isfile(tmp_path / "out" / "config.yaml")


def test_sibling_module_importable(model_dir, tmp_path):
    model = GOOD_MODEL_DEF.replace("import harness", "import harness\nfrom layers import Width")
    model = model.replace(
        "nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)",
        "nn.Linear(64, Width), nn.Tanh(), nn.Linear(Width, 10)",
    )
    write_model_def(model_dir, model_def=model, layers__py="Width = 12\n")
    train_local(model_dir, tmp_path / "out")


def test_pedl_sample_runs_unchanged(tmp_path):
    directory = os.path.join(SAMPLES, "pedl_compat")
    cfg = config.load_config(config.find_config_file(directory))
    cfg.searcher.max_length = config.Length("batches", 4)
    cfg.min_validation_period = None
    result = loop.train(definition.load(directory), cfg, str(tmp_path), distributed.Local())
    assert set(result) == {"error", "validation_loss"}


def test_entrypoint_picks_one_of_several(model_dir, tmp_path):
    two = GOOD_MODEL_DEF + "\n\nclass Other(Trial):\n    pass\n"
    write_model_def(model_dir, model_def=two)
    assert "several PyTorchTrial subclasses (Other, Trial)" in error_of(model_dir, tmp_path)
    write_model_def(model_dir, model_def=two, config=GOOD_CONFIG + "entrypoint: model_def:Other\n")
    assert definition.load(str(model_dir), "model_def:Other").trial_class.__name__ == "Other"


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            dict(model_def="import harness\n\nclass T(harness.PyTorchTrial):\n    def f(self:\n"),
            "syntax error in ",
        ),
        (
            dict(model_def="import harness\nimport no_such_module_xyz\n"),
            "No module named 'no_such_module_xyz'",
        ),
        (dict(model_def="import harness\nx = 1 / 0\n"), "ZeroDivisionError"),
        (dict(model_def="import harness\n"), "no PyTorchTrial subclass found"),
        (
            dict(model_def=GOOD_MODEL_DEF.replace("def losses", "def not_losses")),
            "the losses/validation_metrics API lacks losses()",
        ),
        (dict(data="x = 1\n"), "no make_data_loaders()"),
        (
            dict(data="def make_data_loaders(c, h):\n    return [1, 2, 3]\n"),
            "expected a pair (training, validation)",
        ),
        (
            dict(data="def make_data_loaders(c, h):\n    return 1, 2\n"),
            "returned a int as the training loader",
        ),
        (dict(config=GOOD_CONFIG + "bogus: 1\n"), "unknown config key 'bogus'"),
        (dict(config=GOOD_CONFIG.replace("batch: 20", "batch: 0")), "batch_size() returned 0"),
        (
            dict(config=GOOD_CONFIG + "searcher:\n  metric: nope\n"),
            "duplicate key 'searcher' at the top level",
        ),
    ],
)
def test_bad_definitions_give_one_clear_line(model_dir, tmp_path, files, expected):
    write_model_def(model_dir, **files)
    if expected is None:
        error_of(model_dir, tmp_path)
        return
    message = error_of(model_dir, tmp_path)
    assert expected in message
    if "model_def" in files and "syntax" in expected:
        assert "model_def.py:4" in message


def test_import_error_names_users_file_and_line(model_dir, tmp_path):
    write_model_def(model_dir, model_def="import harness\n\n\nvalue = {}['missing']\n")
    message = error_of(model_dir, tmp_path)
    assert "model_def.py:4" in message and "KeyError" in message


def test_missing_directory(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        definition.load(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "losses, expected",
    [
        ("return {'ce': nn.functional.cross_entropy(predictions, labels)}", "without the key 'loss'"),
        ("return nn.functional.cross_entropy(predictions, labels, reduction='none')", "loss of shape (20,)"),
        ("return 1.0", "returned a float"),
        (
            "return nn.functional.cross_entropy(predictions, labels) * float('nan')",
            "training batch 1; stopping",
        ),
    ],
)
def test_bad_losses(model_dir, tmp_path, losses, expected):
    model = GOOD_MODEL_DEF.replace("return nn.functional.cross_entropy(predictions, labels)", losses)
    write_model_def(model_dir, model_def=model)
    assert expected in error_of(model_dir, tmp_path)


def test_nan_names_first_bad_batch(model_dir, tmp_path):
    model = GOOD_MODEL_DEF.replace("import harness", "import harness\nCALLS = [0]").replace(
        "return nn.functional.cross_entropy(predictions, labels)",
        "CALLS[0] += 1\n        loss = nn.functional.cross_entropy(predictions, labels)\n"
        "        return loss * float('inf') if CALLS[0] == 5 else loss",
    )
    write_model_def(model_dir, model_def=model)
    assert "the loss is not finite (NaN or inf) at training batch 5; stopping" in error_of(
        model_dir, tmp_path
    )


@pytest.mark.parametrize(
    "item, expected",
    [
        ("return 'text', 1", "training batch 1 input[0] is a str"),
        ("return {'a': self.x[i]}", "expected a pair (input, target)"),
        ("return {'a': [self.x[i], 'oops']}, self.y[i]", "input['a'][1][0] is a str"),
    ],
)
def test_bad_batches_name_the_path(model_dir, tmp_path, item, expected):
    data = f"""
import torch
import harness

class DS(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randn(40, 8, 8)
        self.y = torch.randint(0, 10, (40,))
    def __len__(self):
        return 40
    def __getitem__(self, i):
        {item}

def make_data_loaders(config, hparams):
    return harness.DataLoader(DS(), batch_size=4), harness.DataLoader(DS(), batch_size=4)
"""
    write_model_def(model_dir, data=data)
    assert expected in error_of(model_dir, tmp_path)


def test_download_data_bad_path(model_dir, tmp_path):
    data = GOOD_DATA + "\n\ndef download_data(config, hparams):\n    return '/no/such/dir'\n"
    write_model_def(model_dir, data=data)
    assert "download_data() returned '/no/such/dir', which is not an existing directory" in error_of(
        model_dir, tmp_path
    )


def test_download_data_raising_names_location(model_dir, tmp_path):
    data = GOOD_DATA + "\n\ndef download_data(config, hparams):\n    raise OSError('mirror down')\n"
    write_model_def(model_dir, data=data)
    message = error_of(model_dir, tmp_path)
    assert "download_data() raised OSError: mirror down" in message and "data.py:" in message


def test_searcher_metric_must_exist(model_dir, tmp_path):
    write_model_def(model_dir, config=GOOD_CONFIG.replace("searcher:", "searcher:\n  metric: f1"))
    assert "'searcher.metric': 'f1' is not a validation metric (have: accuracy, loss)" in error_of(
        model_dir, tmp_path
    )


def test_hyperparameter_lookup_error(model_dir, tmp_path):
    write_model_def(
        model_dir, model_def=GOOD_MODEL_DEF.replace('get_hyperparameter("batch")', 'get_hyperparameter("bs")')
    )
    assert "hyperparameter 'bs' is not in the config's hyperparameters (have: batch)" in error_of(
        model_dir, tmp_path
    )


# Training metrics: the loss is summed from the per-batch log at each report; other metrics per batch.
RECORDING_MODEL_DEF = (
    GOOD_MODEL_DEF.replace("import harness", "import harness\nSEEN = []")
    .replace(
        "        return nn.functional.cross_entropy(predictions, labels)\n",
        "        loss = nn.functional.cross_entropy(predictions, labels)\n"
        "        SEEN.append({'loss': loss.item(), 'aux': 2 * loss.item()})\n"
        "        return LOSSES\n",
    )
    .replace('return {"loss": losses, "accuracy"', 'return {"accuracy"')
)


@pytest.mark.parametrize(
    "losses, extra",
    [
        ("loss", ""),
        ("{'loss': loss, 'aux': 2 * loss}", ""),
        (
            "loss",
            "\n    def training_metrics(self, predictions, labels, losses):\n"
            "        SEEN[-1]['extra'] = SEEN[-1]['loss'] + 1\n"
            "        return {'extra': losses.detach() + 1}\n",
        ),
    ],
    ids=["tensor", "dict", "training_metrics"],
)
def test_training_metrics_are_means_over_the_report_window(model_dir, tmp_path, losses, extra):
    # Checkpoints every 2 batches split the 3-batch report windows: the checkpoint folds the window so far.
    cfg = GOOD_CONFIG.replace("{batches: 6}", "{batches: 9}") + "min_checkpoint_period: {batches: 2}\n"
    write_model_def(model_dir, model_def=RECORDING_MODEL_DEF.replace("LOSSES", losses) + extra, config=cfg)
    train_local(model_dir, tmp_path / "out")
    seen = __import__("sys").modules["model_def"].SEEN
    lines = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    training = [e for e in lines if e["type"] == "training"]
    assert [e["batches"] for e in training] == [3, 6, 9]
    for e in training:
        window = seen[e["batches"] - 3 : e["batches"]]
        assert set(e["metrics"]) == set(window[0]) & ({"loss"} | set(losses.split("'")) | {"extra"})
        for name, value in e["metrics"].items():
            assert value == pytest.approx(sum(b[name] for b in window) / 3, rel=1e-6)


def test_a_file_that_is_not_python_is_not_read_as_its_folder(tmp_path):
    """`harness notes.txt` beside a model definition: named, not trained from the file's folder."""
    (tmp_path / "model_def.py").write_text("")
    (tmp_path / "experiment.yaml").write_text("hyperparameters: {}\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("hi\n")
    for read in (config.load_for_model, definition.load):
        with pytest.raises(HarnessError) as e:
            read(str(notes))
        assert str(e.value) == (
            f"model definition {notes} is a file, not a directory: give the folder that holds model_def.py "
            "(or a .py file)"
        )
