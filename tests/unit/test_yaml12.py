"""Configs read plain scalars as YAML 1.2, the way PEDL's and Determined's tools read them (ruamel.yaml).

The table below is the contract; the differential test holds the loader against ruamel.yaml itself on many
generated number-like scalars, so a form nobody listed cannot drift either.
"""

import io
import math
import random

import pytest
import yaml

from harness.config import load_config
from harness.config.yaml12 import dump_yaml, load_yaml_file

ruamel_yaml = pytest.importorskip("ruamel.yaml")

# (plain scalar, what a config reads it as)
TABLE = [
    ("1e-4", 1e-4),  # PyYAML (YAML 1.1): the string '1e-4'
    ("5e-05", 5e-05),
    ("-2E+3", -2000.0),
    ("1E5", 100000.0),
    (".5", 0.5),
    ("+.5", 0.5),
    ("-.5", -0.5),
    ("6.", 6.0),
    ("1.e5", 100000.0),
    ("1.0e-4", 1e-4),
    ("1_000.5", 1000.5),
    (".inf", math.inf),
    ("-.inf", -math.inf),
    ("0o17", 15),  # 1.1: a string
    ("-0o17", -15),
    ("017", 17),  # 1.1: octal 15
    ("08", 8),  # 1.1: a string
    ("0x1F", 31),
    ("0b101", 5),
    ("1_000", 1000),
    ("+1", 1),
    ("true", True),
    ("False", False),
    ("TRUE", True),
    ("null", None),
    ("~", None),
    ("yes", "yes"),  # 1.1: True
    ("no", "no"),
    ("on", "on"),
    ("off", "off"),
    ("Y", "Y"),
    ("1:20", "1:20"),  # 1.1: sexagesimal 80
    ("0XFF", "0XFF"),
    ("0o8", "0o8"),
    ("inf", "inf"),
    ("nan", "nan"),
    ("1e", "1e"),
    ("1,000", "1,000"),
]


def load_value(tmp_path, plain):
    path = tmp_path / "c.yaml"
    path.write_text(f"k: {plain}\n")
    return load_yaml_file(str(path))["k"]


def ruamel_value(plain):
    return ruamel_yaml.YAML(typ="safe", pure=True).load(f"k: {plain}\n")["k"]


def same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("plain, expected", TABLE)
def test_scalar_table(tmp_path, plain, expected):
    value = load_value(tmp_path, plain)
    assert same(value, expected), f"{plain!r} read as {value!r}, expected {expected!r}"
    assert same(ruamel_value(plain), expected), "the table disagrees with ruamel.yaml"


def test_nan(tmp_path):
    assert math.isnan(load_value(tmp_path, ".NaN"))


def test_agrees_with_ruamel_on_generated_number_like_scalars(tmp_path):
    rng = random.Random(12)
    alphabet = "0123456789_.eE+-xobXOB:aAfFinNtTrueYsl"
    forms = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(6000)}
    forms |= {"".join(rng.choice("0123456789_.eE+-") for _ in range(rng.randint(1, 6))) for _ in range(6000)}
    lines, kept = [], []
    for i, form in enumerate(sorted(forms)):
        try:  # only forms that both parsers take as a plain scalar on their own
            ours = yaml.safe_load(f"k: {form}")
            theirs = ruamel_value(form)
        except Exception:  # noqa: BLE001 - not a plain scalar (a comment, an alias, ...)
            continue
        if not isinstance(ours, dict) or set(ours) != {"k"}:
            continue
        lines.append(f"k{i}: {form}")
        kept.append((f"k{i}", form, theirs))
    path = tmp_path / "many.yaml"
    path.write_text("\n".join(lines) + "\n")
    data = load_yaml_file(str(path))
    wrong = [(form, data[key], theirs) for key, form, theirs in kept if not same(data[key], theirs)]
    assert len(kept) > 5000
    assert not wrong, f"{len(wrong)} forms differ from ruamel.yaml, e.g. {wrong[:20]}"


def test_learning_rate_reaches_the_trial_as_a_float(tmp_path):
    path = tmp_path / "const.yaml"
    path.write_text("hyperparameters:\n  learning_rate: 1e-4\n  learning_rate_decay: 1e-6\n  flag: on\n")
    cfg = load_config(str(path))
    assert cfg.hyperparameters == {"learning_rate": 1e-4, "learning_rate_decay": 1e-6, "flag": "on"}
    assert cfg.warnings == []


def test_plain_value_that_stays_a_string_but_looks_numeric_is_named(tmp_path):
    path = tmp_path / "const.yaml"
    path.write_text("hyperparameters:\n  lr: .5e3\n  quoted: '.5e3'\n  big: inf\n  name: abc\n")
    cfg = load_config(str(path))
    assert cfg.hyperparameters["lr"] == ".5e3"
    assert len(cfg.warnings) == 2, cfg.warnings
    first, second = cfg.warnings
    assert first.startswith(f"{path} line 2: hyperparameters.lr: .5e3 is read as the string '.5e3'")
    assert "write 500.0 for a number" in first
    assert "line 4: hyperparameters.big" in second and "write .inf for a number" in second


@pytest.mark.parametrize("value", ["yes", "0o17", "1e-4", "017", "1:20", "on", ".5", "1_000", "true", "null"])
def test_dumped_strings_read_back_as_strings_under_both_schemas(tmp_path, value):
    stream = io.StringIO()
    dump_yaml({"k": value, "n": 1e-05, "i": 15}, stream)
    path = tmp_path / "out.yaml"
    path.write_text(stream.getvalue())
    expected = {"k": value, "n": 1e-05, "i": 15}
    assert load_yaml_file(str(path)) == expected  # YAML 1.2
    assert yaml.safe_load(stream.getvalue()) == expected  # YAML 1.1 (PyYAML)
