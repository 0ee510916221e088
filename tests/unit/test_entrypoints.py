"""Every PEDL entry-point form, their order, and PEDL's 3-argument data functions, in one process.

Forms (harness/definition.py): the config's `entrypoints:` section (v0.11), `entrypoint: module:Class`
(Determined), a .py file given, the directory's `__init__.py` (v0.10), model_def.py and data.py.
"""

import json
import os
import shutil

import pytest
from conftest import GOOD_CONFIG, GOOD_DATA, GOOD_MODEL_DEF, SAMPLES, write_model_def

from harness import config, definition, distributed
from harness.errors import HarnessError
from harness.train import data as train_data
from harness.train import loop

# A second trial class and a second loader function, in their own modules.
OTHER_MODEL = GOOD_MODEL_DEF.replace("class Trial(", "class OtherTrial(")
OTHER_DATA = GOOD_DATA.replace("def make_data_loaders(", "def make_other_loaders(") + (
    "\n\ndef fetch(config, hparams):\n    import tempfile\n    return tempfile.mkdtemp()\n"
)


def write_init(directory, text):
    with open(os.path.join(directory, "__init__.py"), "w") as f:
        f.write(text)


def load(directory, text=GOOD_CONFIG, name="experiment.yaml"):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    cfg = config.load_config(path)
    return definition.load_for(str(directory), cfg), cfg


def refused(directory, text):
    with pytest.raises(HarnessError) as e:
        load(directory, text)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_entrypoints_section_names_trial_loader_and_download(model_dir):
    write_model_def(model_dir, other_model__py=OTHER_MODEL, other_data__py=OTHER_DATA)
    model_def, _ = load(
        model_dir,
        GOOD_CONFIG
        + "entrypoints:\n  trial_class: other_model:OtherTrial\n"
        + "  data_loaders_function: other_data:make_other_loaders\n"
        + "  download_data_function: other_data:fetch\n",
    )
    assert model_def.trial_class.__name__ == "OtherTrial"
    assert model_def.make_data_loaders.__name__ == "make_other_loaders"
    assert model_def.download_data.__name__ == "fetch"


def test_entrypoints_keys_left_out_are_found_as_without_the_section(model_dir):
    write_model_def(model_dir, other_data__py=OTHER_DATA)
    model_def, _ = load(
        model_dir, GOOD_CONFIG + "entrypoints:\n  data_loaders_function: other_data:make_other_loaders\n"
    )
    assert model_def.trial_class.__name__ == "Trial"  # model_def.py
    assert model_def.make_data_loaders.__name__ == "make_other_loaders"
    assert model_def.download_data is None


@pytest.mark.parametrize(
    "section, expected",
    [
        (
            "  trial_class: nowhere:Trial\n",
            "config key 'entrypoints.trial_class': no module 'nowhere' in {d} (looked for {d}/nowhere.py)",
        ),
        (
            "  trial_class: model_def:Missing\n",
            "no class 'Missing' (named by the config key 'entrypoints.trial_class')",
        ),
        (
            "  data_loaders_function: data:make_other\n",
            "config key 'entrypoints.data_loaders_function': {d}/data.py has no 'make_other' "
            "(the function named by 'data:make_other')",
        ),
        (
            "  download_data_function: nowhere.deeper:fetch\n",
            "config key 'entrypoints.download_data_function': no module 'nowhere.deeper' in {d} "
            "(looked for {d}/nowhere/deeper.py)",
        ),
        (
            "  data_loaders_function: data:VALUE\n",
            "config key 'entrypoints.data_loaders_function': 'data:VALUE' is a int",
        ),
        ("  trial_class: model_def.Trial\n", "config key 'entrypoints.trial_class': expected 'module:name'"),
        ("  trial_clas: model_def:Trial\n", "unknown config key 'entrypoints.trial_clas'"),
    ],
)
def test_a_name_that_does_not_resolve_is_one_line_naming_the_key(model_dir, section, expected):
    write_model_def(model_dir, data=GOOD_DATA + "\nVALUE = 3\n")
    message = refused(model_dir, GOOD_CONFIG + "entrypoints:\n" + section)
    assert expected.format(d=os.path.abspath(model_dir)) in message


def test_entrypoint_and_entrypoints_trial_class_together_are_refused(model_dir):
    write_model_def(model_dir)
    message = refused(
        model_dir, GOOD_CONFIG + "entrypoint: model_def:Trial\nentrypoints:\n  trial_class: model_def:Trial\n"
    )
    assert "'entrypoint' and 'entrypoints.trial_class' both name the trial class; keep one" in message


# PEDL v0.10: the package's __init__.py

INIT = """
import harness
from data import make_other_loaders as make_data_loaders, fetch as download_data
from other_model import OtherTrial

SEEN_DATA = harness.get_data_config()  # read at import, as PEDL's examples did
"""


def test_init_py_chooses_trial_and_data_functions(model_dir):
    write_model_def(model_dir, data=OTHER_DATA, other_model__py=OTHER_MODEL)
    write_init(model_dir, INIT)
    model_def, _ = load(model_dir, GOOD_CONFIG + "data:\n  kind: two\n")
    assert model_def.trial_class.__name__ == "OtherTrial"  # not model_def.py's Trial
    assert model_def.make_data_loaders.__name__ == "make_other_loaders"
    assert model_def.download_data.__name__ == "fetch"
    assert model_def.trial_class.__module__ == "other_model"
    import sys

    assert sys.modules[definition.PACKAGE].SEEN_DATA == {"kind": "two"}


def test_init_py_with_relative_imports(model_dir):
    write_model_def(model_dir)
    write_init(model_dir, "from .model_def import Trial\nfrom .data import make_data_loaders\n")
    model_def, _ = load(model_dir)
    assert model_def.trial_class.__name__ == "Trial"


@pytest.mark.parametrize("init", ["", "import os\n"])
def test_init_py_without_a_trial_is_not_the_entry_point(model_dir, init):
    write_model_def(model_dir)
    write_init(model_dir, init)
    model_def, _ = load(model_dir)
    assert model_def.trial_class.__module__ == "model_def"


def test_config_keys_win_over_init_py(model_dir):
    write_model_def(model_dir, data=GOOD_DATA + OTHER_DATA, other_model__py=OTHER_MODEL)
    write_init(model_dir, INIT)
    model_def, _ = load(model_dir, GOOD_CONFIG + "entrypoint: model_def:Trial\n")
    assert model_def.trial_class.__name__ == "Trial"
    model_def, _ = load(
        model_dir,
        GOOD_CONFIG
        + "entrypoints:\n  trial_class: model_def:Trial\n  data_loaders_function: data:make_other_loaders\n",
    )
    assert model_def.trial_class.__name__ == "Trial"
    assert model_def.download_data is None  # __init__.py's is not consulted: it is not the entry point


def test_a_file_given_wins_over_init_py(model_dir):
    write_model_def(model_dir, data=GOOD_DATA + OTHER_DATA, other_model__py=OTHER_MODEL)
    write_init(model_dir, INIT)
    cfg = config.load_config(os.path.join(model_dir, "experiment.yaml"))
    model_def = definition.load_for(os.path.join(model_dir, "model_def.py"), cfg)
    assert model_def.trial_class.__name__ == "Trial"


def test_init_py_errors_name_the_file(model_dir):
    write_model_def(model_dir)
    write_init(model_dir, "from model_def import Trial\nimport no_such_module_qq\n")
    message = refused(model_dir, GOOD_CONFIG)
    assert "No module named 'no_such_module_qq'" in message
    assert f"{os.path.abspath(model_dir)}/__init__.py:2" in message
    two = "from model_def import Trial\nfrom other_model import OtherTrial\n"
    write_model_def(model_dir, other_model__py=OTHER_MODEL)
    write_init(model_dir, two)
    assert "__init__.py: several PyTorchTrial subclasses (OtherTrial, Trial)" in refused(
        model_dir, GOOD_CONFIG
    )


def test_init_py_sees_this_directorys_data_module_not_another_ones(model_dir, tmp_path):
    first = tmp_path / "first"
    write_model_def(first)
    load(first)  # imports a module named `data` from `first`
    write_model_def(model_dir, data=OTHER_DATA, other_model__py=OTHER_MODEL)
    write_init(model_dir, INIT)
    model_def, _ = load(model_dir)
    assert model_def.make_data_loaders.__name__ == "make_other_loaders"


# PEDL's 3-argument data functions

DATA_3 = """
import os
import numpy as np
import torch
import harness

CALLS = []


def download_data(experiment_config, hparams, download_data_dir):
    CALLS.append(("download", download_data_dir))
    from sklearn.datasets import load_digits
    d = load_digits()
    np.save(os.path.join(download_data_dir, "x.npy"), d.images[:400] / 16.0)
    np.save(os.path.join(download_data_dir, "y.npy"), d.target[:400])
    return {returned}


def make_data_loaders(experiment_config, hparams, download_data_dir):
    CALLS.append(("loaders", download_data_dir))
    x = torch.tensor(np.load(os.path.join(download_data_dir, "x.npy")), dtype=torch.float32)
    y = torch.tensor(np.load(os.path.join(download_data_dir, "y.npy")))
    train = torch.utils.data.TensorDataset(x[:300], y[:300])
    val = torch.utils.data.TensorDataset(x[300:], y[300:])
    return harness.DataLoader(train, batch_size=20, shuffle=True), harness.DataLoader(val, batch_size=16)
"""


@pytest.mark.parametrize("returned", ["download_data_dir", "None"])
def test_three_argument_data_functions(model_dir, tmp_path, monkeypatch, returned):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "machine"))
    write_model_def(model_dir, data=DATA_3.format(returned=returned))
    model_def, cfg = load(model_dir, GOOD_CONFIG + "data:\n  source: digits\n")
    assert model_def.loaders_take_dir and model_def.download_takes_dir
    loop.train(model_def, cfg, str(tmp_path / "out"), distributed.Local())
    calls = __import__("data").CALLS
    directory = train_data.machine_data_dir(str(model_dir), cfg.as_dict())
    assert os.path.dirname(directory) == str(tmp_path / "machine")
    assert calls == [("download", directory), ("loaders", directory)]
    assert sorted(os.listdir(directory)) == ["x.npy", "y.npy"]


def test_machine_data_dir_differs_by_definition_and_data_section(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "machine"))
    one = train_data.machine_data_dir(str(model_dir), {"data": {"url": "a"}})
    assert one == train_data.machine_data_dir(str(model_dir), {"data": {"url": "a"}})  # kept between runs
    assert one != train_data.machine_data_dir(str(model_dir), {"data": {"url": "b"}})
    assert one != train_data.machine_data_dir(str(tmp_path / "other"), {"data": {"url": "a"}})
    assert os.path.basename(one).startswith("model-")


def test_three_argument_loaders_without_download_data_are_refused(model_dir):
    data = DATA_3.format(returned="None").replace("def download_data(", "def not_download(")
    write_model_def(model_dir, data=data)
    message = refused(model_dir, GOOD_CONFIG)
    assert message.startswith(f"{os.path.abspath(model_dir)}/data.py:")
    assert (
        "make_data_loaders() takes download_data_dir, but the model definition has no download_data()"
        in message
    )


@pytest.mark.parametrize(
    "signature, takes_dir",
    [
        ("(config, hparams)", False),
        ("(config, hparams, download_data_dir=None)", True),
        ("(config, hparams=None)", False),
        ("(*args)", False),
        ("(config, hparams, *, extra=1)", False),
    ],
)
def test_the_form_is_told_by_the_signature(model_dir, signature, takes_dir):
    data = GOOD_DATA.replace("def make_data_loaders(config, hparams):", f"def make_data_loaders{signature}:")
    write_model_def(model_dir, data=data + "\n\ndef download_data(c, h):\n    return '.'\n")
    model_def, _ = load(model_dir)
    assert model_def.loaders_take_dir is takes_dir


@pytest.mark.parametrize("signature", ["(config)", "(a, b, c, d)", "()", "(config, hparams, *, extra)"])
def test_a_signature_of_neither_form_is_one_line_naming_the_file(model_dir, signature):
    data = GOOD_DATA.replace("def make_data_loaders(config, hparams):", f"def make_data_loaders{signature}:")
    write_model_def(model_dir, data=data)
    message = refused(model_dir, GOOD_CONFIG)
    assert message.startswith(f"{os.path.abspath(model_dir)}/data.py:")
    assert (
        "does not take the harness's arguments; write make_data_loaders(experiment_config, hparams) or "
        in message
    )


# The sample in PEDL v0.10 / v0.11 layout: both forms find the same trial and data, and train the same.


def test_sample_v010_and_v011_layouts_train_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "machine"))
    sample = tmp_path / "pedl_v010"
    shutil.copytree(os.path.join(SAMPLES, "pedl_v010"), sample)
    v011 = config.load_config(str(sample / "const-multi-output.yaml"))
    v010 = config.load_config(str(sample / "const.yaml"))
    v010.data = {"model_type": "multi_output"}
    for cfg in (v011, v010):
        cfg.searcher.max_length = config.Length("batches", 8)
        cfg.min_validation_period = None
    assert v011.hyperparameters["learning_rate"] == 5e-3 and v011.hyperparameters["weight_decay"] == 1e-4
    results = []
    for cfg, out in ((v011, "v011"), (v010, "v010")):
        model_def = definition.load_for(str(sample), cfg)
        assert model_def.trial_class.__name__ == "MultiDigitsTrial"
        assert model_def.make_data_loaders.__name__ == "make_multi_data_loaders"
        loop.train(model_def, cfg, str(tmp_path / out), distributed.Local())
        with open(tmp_path / out / "metrics.jsonl") as f:
            results.append([json.loads(line)["metrics"] for line in f if '"validation"' in line])
    assert results[0] == results[1] and set(results[0][-1]) == {
        "validation_error",
        "high_error",
        "validation_loss",
    }


def test_a_checkpoint_is_used_with_the_entry_points_it_was_trained_with(tmp_path, monkeypatch):
    """load_trial and `harness evaluate --config` find the trial and loader that training found, also when
    the config given now lacks the `entrypoints:` section."""
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "machine"))
    sample = tmp_path / "pedl_v010"
    shutil.copytree(os.path.join(SAMPLES, "pedl_v010"), sample)
    cfg = config.load_config(str(sample / "const-multi-output.yaml"))
    cfg.searcher.max_length = config.Length("batches", 4)
    cfg.min_validation_period = None
    loop.train(definition.load_for(str(sample), cfg), cfg, str(tmp_path / "out"), distributed.Local())
    ckpt = os.path.join(tmp_path, "out", "checkpoints", "4")

    import harness

    trial, _ = harness.load_trial(ckpt)
    assert type(trial).__name__ == "MultiDigitsTrial"
    plain = tmp_path / "plain.yaml"  # the same training, without entrypoints: const.yaml's __init__ form
    plain.write_text((sample / "const-multi-output.yaml").read_text().split("entrypoints:")[0] + "data: {}\n")
    from harness.output import checkpoint
    from harness.results import evaluate

    cfg_now, _ = evaluate.effective_config(str(sample), str(plain), ckpt, checkpoint.read_state(ckpt))
    assert cfg_now.entrypoints.trial_class == "model_def_multi_output:MultiDigitsTrial"
    assert cfg_now.entrypoints.data_loaders_function == "data:make_multi_data_loaders"
