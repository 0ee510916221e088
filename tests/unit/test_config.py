"""Unit tests for harness.config: schema defaults, validation messages, file discovery and loading."""

import math
import os
import textwrap

import pytest

from harness.config import (
    ExperimentConfig,
    Length,
    ReproducibilityConfig,
    SearcherConfig,
    find_config_file,
    load_config,
    parse_config,
)
from harness.errors import HarnessError


def write(tmp_path, text, name="experiment.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# Defaults


@pytest.mark.parametrize("raw", [None, {}])
def test_parse_config_defaults(raw):
    cfg = parse_config(raw)
    assert cfg.scheduling_unit == 100
    assert cfg.searcher.name == "single"
    assert cfg.searcher.max_length == Length("epochs", 1)
    assert cfg.searcher.max_length.as_dict() == {"epochs": 1}
    assert cfg.searcher.smaller_is_better is True
    assert cfg.searcher.metric is None
    assert cfg.reproducibility.experiment_seed is None
    assert cfg.min_validation_period is None
    assert cfg.hyperparameters == {}
    assert cfg.data == {}
    assert cfg.entrypoint is None


def test_load_config_none_and_empty_file_give_defaults(tmp_path):
    assert load_config(None) == ExperimentConfig()
    assert load_config(write(tmp_path, "")) == ExperimentConfig()
    assert load_config(write(tmp_path, "# only a comment\n", "c.yaml")) == ExperimentConfig()


def test_defaults_are_not_shared_between_configs():
    a = parse_config({})
    b = parse_config({})
    a.hyperparameters["x"] = 1
    a.searcher.metric = "loss"
    assert b.hyperparameters == {}
    assert b.searcher.metric is None


def test_full_config_is_parsed(tmp_path):
    path = write(
        tmp_path,
        """
        description: a test
        name: exp
        hyperparameters:
          lr: 0.5
          batch: {type: const, val: 32}
          nested: {a: 1, b: [1, 2]}
        searcher:
          name: single
          metric: accuracy
          smaller_is_better: false
          max_length: {batches: 600}
        min_validation_period: {records: 1000}
        scheduling_unit: 7
        reproducibility:
          experiment_seed: 42
        data:
          url: http://example.invalid/x
        entrypoint: model_def:Trial
        """,
    )
    cfg = load_config(path)
    assert cfg.description == "a test"
    assert cfg.name == "exp"
    assert cfg.hyperparameters == {"lr": 0.5, "batch": 32, "nested": {"a": 1, "b": [1, 2]}}
    assert cfg.searcher == SearcherConfig("single", "accuracy", False, Length("batches", 600))
    assert cfg.min_validation_period == Length("records", 1000)
    assert cfg.scheduling_unit == 7
    assert cfg.reproducibility == ReproducibilityConfig(42)
    assert cfg.data == {"url": "http://example.invalid/x"}
    assert cfg.entrypoint == "model_def:Trial"


# Hyperparameters


def test_const_hyperparameters_are_resolved():
    cfg = parse_config(
        {
            "hyperparameters": {
                "lr": {"type": "const", "val": 0.01},
                "layers": {"type": "const", "val": [64, 32]},
                "plain": 3,
                "group": {"width": 8},
            }
        }
    )
    assert cfg.hyperparameters == {"lr": 0.01, "layers": [64, 32], "plain": 3, "group": {"width": 8}}


@pytest.mark.parametrize(
    "spec,kind",
    [
        ({"type": "double", "minval": 0.001, "maxval": 0.1}, "double"),
        ({"type": "int", "minval": 1, "maxval": 4}, "int"),
        ({"type": "categorical", "vals": [1, 2]}, "categorical"),
        ({"type": "log", "minval": -3, "maxval": -1, "base": 10}, "log"),
    ],
)
def test_non_const_hyperparameter_is_rejected_naming_the_key(spec, kind):
    with pytest.raises(HarnessError) as e:
        parse_config({"hyperparameters": {"ok": 1, "learning_rate": spec}}, "exp.yaml")
    msg = str(e.value)
    assert msg.startswith("exp.yaml: ")
    assert "'hyperparameters.learning_rate'" in msg
    assert kind in msg


def test_nested_hyperparameter_groups_are_resolved():
    cfg = parse_config({"hyperparameters": {"optim": {"lr": {"type": "const", "val": 0.1}, "momentum": 0.9}}})
    assert cfg.hyperparameters == {"optim": {"lr": 0.1, "momentum": 0.9}}


def test_nested_search_hyperparameter_is_rejected_naming_the_key():
    spec = {"optim": {"lr": {"type": "double", "minval": 0.01, "maxval": 0.1}}}
    with pytest.raises(HarnessError, match=r"'hyperparameters\.optim\.lr'.*'double'"):
        parse_config({"hyperparameters": spec})


def test_const_hyperparameter_without_val_is_rejected():
    with pytest.raises(HarnessError, match=r"'hyperparameters\.lr'.*'val'"):
        parse_config({"hyperparameters": {"lr": {"type": "const"}}})


def test_hyperparameters_must_be_a_mapping():
    with pytest.raises(HarnessError, match="'hyperparameters'"):
        parse_config({"hyperparameters": [1, 2]})


# Unknown and cluster-only keys


@pytest.mark.parametrize(
    "raw,dotted",
    [
        ({"foo": 1}, "foo"),
        ({"searcher": {"foo": 1}}, "searcher.foo"),
        ({"reproducibility": {"seed": 1}}, "reproducibility.seed"),
        ({"searcher": {"max_length": {"epochs": 1}, "max_lenght": {"epochs": 2}}}, "searcher.max_lenght"),
    ],
)
def test_unknown_key_is_rejected_naming_the_dotted_key(raw, dotted):
    with pytest.raises(HarnessError) as e:
        parse_config(raw, "my.yaml")
    msg = str(e.value)
    assert msg.startswith("my.yaml: ")
    assert f"unknown config key '{dotted}'" in msg


def test_unknown_nested_key_lists_the_known_keys_of_its_section():
    with pytest.raises(HarnessError) as e:
        parse_config({"searcher": {"foo": 1}})
    msg = str(e.value)
    for known in ("max_length", "metric", "name", "smaller_is_better"):
        assert known in msg


@pytest.mark.parametrize("key", ["resources", "environment", "bind_mounts", "optimizations"])
def test_cluster_only_keys_get_their_own_message(key):
    with pytest.raises(HarnessError) as e:
        parse_config({key: {}}, "exp.yaml")
    msg = str(e.value)
    assert f"'{key}'" in msg
    assert "Determined cluster setting" in msg
    assert "unknown config key" not in msg


def test_resources_message_points_at_the_launcher():
    with pytest.raises(HarnessError, match="horovodrun"):
        parse_config({"resources": {"slots_per_trial": 4}})


# Wrong types: the error names the key and the file


@pytest.mark.parametrize(
    "text,key",
    [
        ("scheduling_unit: ten\n", "'scheduling_unit'"),
        ("scheduling_unit: 1.5\n", "'scheduling_unit'"),
        ("scheduling_unit: true\n", "'scheduling_unit'"),
        ("scheduling_unit: 0\n", "'scheduling_unit'"),
        ("searcher:\n  smaller_is_better: 3\n", "'searcher.smaller_is_better'"),
        ("searcher:\n  metric: 3\n", "'searcher.metric'"),
        ("searcher:\n  max_length: {steps: 3}\n", "'searcher.max_length.steps'"),
        ("searcher:\n  max_length: {batches: 0}\n", "'searcher.max_length.batches'"),
        ("searcher:\n  max_length: {batches: -2}\n", "'searcher.max_length.batches'"),
        ("searcher:\n  max_length: {batches: 2.5}\n", "'searcher.max_length.batches'"),
        ("searcher:\n  max_length: {batches: true}\n", "'searcher.max_length.batches'"),
        ("searcher:\n  max_length: {batches: 1, epochs: 1}\n", "'searcher.max_length'"),
        ("searcher:\n  max_length: 5\n", "'searcher.max_length'"),
        ("searcher:\n  name: adaptive_asha\n", "'searcher.name'"),
        ("searcher: 3\n", "'searcher'"),
        ("min_validation_period: {epochs: x}\n", "'min_validation_period.epochs'"),
        ("reproducibility:\n  experiment_seed: abc\n", "'reproducibility.experiment_seed'"),
        ("description: [1]\n", "'description'"),
        ("data: 5\n", "'data'"),
        ("entrypoint: model_def.Trial\n", "'entrypoint'"),
    ],
)
def test_wrong_types_name_the_key_and_the_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    assert key in msg


def test_optional_keys_accept_null():
    cfg = parse_config(
        {"searcher": {"metric": None}, "reproducibility": {"experiment_seed": None}, "entrypoint": None}
    )
    assert cfg.searcher.metric is None
    assert cfg.reproducibility.experiment_seed is None
    assert cfg.entrypoint is None


# YAML problems


def test_invalid_yaml_names_file_and_line(tmp_path):
    # Line 3 holds a second ': ' inside a plain scalar, which YAML rejects ("mapping values are not allowed").
    path = write(tmp_path, "name: ok\ndescription: fine\nscheduling_unit: a: b\n")
    with pytest.raises(HarnessError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} line 3: ")
    assert "invalid YAML" in msg


def test_unclosed_flow_sequence_is_invalid_yaml(tmp_path):
    path = write(tmp_path, "searcher:\n  max_length: [1, 2\n")
    with pytest.raises(HarnessError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path} line ")
    assert "invalid YAML" in str(e.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level_is_rejected(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ")
    assert "mapping" in str(e.value)


def test_non_mapping_top_level_is_rejected_by_parse_config():
    with pytest.raises(HarnessError, match="mapping"):
        parse_config(["a", "b"], "x.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "executed"
    path = write(tmp_path, f"description: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(HarnessError) as e:
        load_config(path)
    assert not marker.exists(), "the YAML loader executed a python/object tag"
    assert str(e.value).startswith(path)
    assert "invalid YAML" in str(e.value)


def test_yaml_python_tag_at_top_level_is_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = write(tmp_path, f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(HarnessError):
        load_config(path)
    assert not marker.exists()


# find_config_file


def test_find_config_file_prefers_explicit(tmp_path):
    write(tmp_path, "name: a\n", "experiment.yaml")
    write(tmp_path, "name: b\n", "const.yaml")
    explicit = write(tmp_path, "name: c\n", "other.yaml")
    assert find_config_file(str(tmp_path), explicit) == explicit


def test_find_config_file_prefers_experiment_yaml_over_const_yaml(tmp_path):
    write(tmp_path, "name: a\n", "experiment.yaml")
    write(tmp_path, "name: b\n", "const.yaml")
    assert find_config_file(str(tmp_path)) == os.path.join(str(tmp_path), "experiment.yaml")


def test_find_config_file_falls_back_to_const_yaml(tmp_path):
    write(tmp_path, "name: b\n", "const.yaml")
    assert find_config_file(str(tmp_path)) == os.path.join(str(tmp_path), "const.yaml")


def test_find_config_file_none_when_no_file(tmp_path):
    assert find_config_file(str(tmp_path)) is None
    (tmp_path / "experiment.yaml").mkdir()  # a directory of that name is not a config file
    assert find_config_file(str(tmp_path)) is None


def test_find_config_file_missing_explicit_is_an_error(tmp_path):
    write(tmp_path, "name: a\n", "experiment.yaml")
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(HarnessError) as e:
        find_config_file(str(tmp_path), missing)
    assert missing in str(e.value)
    assert "does not exist" in str(e.value)


# Length


@pytest.mark.parametrize("n,bpe,gbs", [(1, 10, 32), (7, 3, 5), (250, 1, 1)])
def test_length_batches_is_taken_as_is(n, bpe, gbs):
    assert Length("batches", n).to_batches(bpe, gbs) == n


@pytest.mark.parametrize("n,bpe", [(1, 10), (3, 7), (2, 1)])
def test_length_epochs_multiplies_by_batches_per_epoch(n, bpe):
    assert Length("epochs", n).to_batches(bpe, 1000) == n * bpe


@pytest.mark.parametrize("n,gbs", [(100, 32), (96, 32), (97, 32), (1, 64), (64, 64), (65, 64), (5, 1)])
def test_length_records_rounds_up_to_whole_batches(n, gbs):
    got = Length("records", n).to_batches(999, gbs)
    assert got == math.ceil(n / gbs)
    assert (got - 1) * gbs < n <= got * gbs


# as_dict


def test_as_dict_has_determined_shape():
    cfg = parse_config(
        {
            "hyperparameters": {"lr": {"type": "const", "val": 0.1}},
            "searcher": {"max_length": {"records": 640}, "metric": "loss"},
            "min_validation_period": {"batches": 5},
        }
    )
    d = cfg.as_dict()
    assert d["hyperparameters"] == {"lr": 0.1}
    assert d["searcher"] == {
        "name": "single",
        "metric": "loss",
        "smaller_is_better": True,
        "max_length": {"records": 640},
    }
    assert d["min_validation_period"] == {"batches": 5}
    assert d["reproducibility"] == {"experiment_seed": None}
    assert d["scheduling_unit"] == 100


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {
            "description": "d",
            "name": "n",
            "hyperparameters": {"lr": {"type": "const", "val": 0.1}, "g": {"a": [1, 2]}, "p": 4},
            "searcher": {"metric": "acc", "smaller_is_better": False, "max_length": {"records": 10}},
            "min_validation_period": {"epochs": 2},
            "scheduling_unit": 3,
            "reproducibility": {"experiment_seed": 7},
            "data": {"k": "v"},
            "entrypoint": "m:C",
        },
    ],
)
def test_as_dict_round_trips_through_parse_config(raw):
    cfg = parse_config(raw)
    again = parse_config(cfg.as_dict())
    assert again == cfg
    assert again.as_dict() == cfg.as_dict()
