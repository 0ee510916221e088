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
    assert f"'{kind}' is a hyperparameter search: run it with `harness search MODEL_DIR --config FILE" in msg
    assert "use searcher.name: single with one value per hyperparameter" in msg


def test_unknown_hyperparameter_type_lists_the_types():
    with pytest.raises(
        HarnessError, match=r"'hyperparameters\.lr': unknown type 'float' \(known: const, int"
    ):
        parse_config({"hyperparameters": {"lr": {"type": "float", "val": 1}}})


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


@pytest.mark.parametrize(
    "raw,dotted",
    [
        ({"resources": {"slots_per_trial": 2}}, "resources"),
        ({"environment": {"image": "pedl/pytorch"}}, "environment"),
        ({"bind_mounts": [{"host_path": "/d", "container_path": "/d"}]}, "bind_mounts"),
        ({"data_layer": {"type": "shared_fs"}}, "data_layer"),
        ({"tensorboard_storage": {"type": "shared_fs"}}, "tensorboard_storage"),
        ({"labels": ["a"]}, "labels"),
        ({"records_per_epoch": 60000}, "records_per_epoch"),
        ({"checkpoint_storage": {"type": "s3", "bucket": "b"}}, "checkpoint_storage.type/bucket"),
        ({"searcher": {"source_trial_id": 3}}, "searcher.source_trial_id"),
    ],
)
def test_cluster_keys_are_ignored_with_one_warning(raw, dotted):
    cfg = parse_config(raw, "const.yaml")
    assert len(cfg.warnings) == 1
    line = cfg.warnings[0]
    assert line.startswith("const.yaml: ignoring cluster settings: ")
    assert f" {dotted} (" in line
    assert "\n" not in line
    assert cfg == ExperimentConfig(slots_per_trial=cfg.slots_per_trial)  # nothing else changed


def test_warning_lists_every_ignored_key_with_its_reason_in_one_line():
    raw = {
        "resources": {"slots_per_trial": 2, "max_slots": 4, "agent_label": "gpu", "priority": 1},
        "bind_mounts": [{"host_path": "/data", "container_path": "/data"}],
        "checkpoint_storage": {"type": "shared_fs", "host_path": "/tmp", "save_trial_latest": 3},
    }
    cfg = parse_config(raw, "const.yaml")
    assert cfg.warnings == [
        "const.yaml: ignoring cluster settings: resources (ranks come from the launcher), "
        "bind_mounts (mount volumes yourself), checkpoint_storage.type/host_path (checkpoints go to --output)"
    ]
    assert cfg.ignored == {
        "resources": raw["resources"],
        "bind_mounts": raw["bind_mounts"],
        "checkpoint_storage.type": "shared_fs",
        "checkpoint_storage.host_path": "/tmp",
    }
    assert raw["checkpoint_storage"] == {"type": "shared_fs", "host_path": "/tmp", "save_trial_latest": 3}


def test_no_warning_without_cluster_keys():
    cfg = parse_config({"searcher": {"max_steps": 2}, "checkpoint_storage": {"save_trial_best": 2}})
    assert cfg.warnings == []
    assert cfg.ignored == {}
    assert cfg.slots_per_trial is None


def test_checkpoint_storage_paths_are_ignored_but_keep_counts_are_honoured():
    storage = {"type": "shared_fs", "host_path": "/tmp", "storage_path": "ckpt", "save_trial_latest": 4}
    cfg = parse_config({"checkpoint_storage": {**storage, "save_trial_best": 0}})
    assert cfg.checkpoint_storage.save_trial_latest == 4
    assert cfg.checkpoint_storage.save_trial_best == 0
    assert "checkpoint_storage.type/host_path/storage_path (" in cfg.warnings[0]
    assert cfg.as_dict()["checkpoint_storage"] == {"save_trial_latest": 4, "save_trial_best": 0}


@pytest.mark.parametrize(
    "raw,dotted,suggestion",
    [
        ({"resorces": {"slots_per_trial": 2}}, "resorces", "resources"),
        ({"serarcher": {"name": "single"}}, "serarcher", "searcher"),
        ({"checkpoint_storage": {"host_pth": "/tmp"}}, "checkpoint_storage.host_pth", "host_path"),
        ({"searcher": {"max_step": 3}}, "searcher.max_step", "max_steps"),
    ],
)
def test_typos_of_known_or_cluster_keys_are_still_errors(raw, dotted, suggestion):
    with pytest.raises(HarnessError) as e:
        parse_config(raw, "const.yaml")
    msg = str(e.value)
    assert msg.startswith(f"const.yaml: unknown config key '{dotted}' (known: ")
    assert f"did you mean '{suggestion}'?" in msg


@pytest.mark.parametrize("key", ["warnings", "ignored", "slots_per_trial"])
def test_attributes_set_by_the_parser_are_not_config_keys(key):
    with pytest.raises(HarnessError, match=f"unknown config key '{key}'"):
        parse_config({key: []})


@pytest.mark.parametrize("slots", [0, 1, 8])
def test_slots_per_trial_is_stored(slots):
    cfg = parse_config({"resources": {"slots_per_trial": slots, "weight": 1, "native_parallel": False}})
    assert cfg.slots_per_trial == slots
    assert parse_config({"resources": {"max_slots": 4}}).slots_per_trial is None
    assert parse_config({"resources": None}).slots_per_trial is None


@pytest.mark.parametrize(
    "resources,key",
    [
        ([1], "'resources'"),
        ({"slots_per_trial": "two"}, "'resources.slots_per_trial'"),
        ({"slots_per_trial": -1}, "'resources.slots_per_trial'"),
        ({"slots_per_trial": True}, "'resources.slots_per_trial'"),
    ],
)
def test_bad_slots_per_trial_is_an_error(resources, key):
    with pytest.raises(HarnessError, match=key):
        parse_config({"resources": resources})


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
        ("searcher:\n  max_steps: 0\n", "'searcher.max_steps'"),
        ("searcher:\n  max_steps: 1.5\n", "'searcher.max_steps'"),
        ("batches_per_step: 0\n", "'batches_per_step'"),
        ("batches_per_step: -5\n", "'batches_per_step'"),
        ("batches_per_step: 2.5\n", "'batches_per_step'"),
        ("batches_per_step: true\n", "'batches_per_step'"),
        ("min_validation_period: 0\n", "'min_validation_period'"),
        ("min_checkpoint_period: -1\n", "'min_checkpoint_period'"),
        ("min_checkpoint_period: 1.5\n", "'min_checkpoint_period'"),
        ("checkpoint_policy: 3\n", "'checkpoint_policy'"),
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
    assert d["batches_per_step"] == 100
    assert d["checkpoint_policy"] == "best"
    assert not {"warnings", "ignored", "slots_per_trial"} & set(d)


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
        {
            "searcher": {"max_steps": 9, "metric": "loss", "source_trial_id": 1},
            "batches_per_step": 20,
            "min_validation_period": 3,
            "min_checkpoint_period": {"epochs": 1},
            "checkpoint_policy": "all",
            "resources": {"slots_per_trial": 2},
            "environment": {"image": "x"},
            "checkpoint_storage": {"type": "shared_fs", "host_path": "/tmp", "save_trial_best": 2},
        },
    ],
)
def test_as_dict_round_trips_through_parse_config(raw):
    cfg = parse_config(raw)
    again = parse_config(cfg.as_dict())
    assert again == cfg
    assert again.as_dict() == cfg.as_dict()
    assert again.slots_per_trial == cfg.slots_per_trial
    assert {k: v for k, v in again.ignored.items() if "." not in k} == {
        k: v for k, v in cfg.ignored.items() if "." not in k
    }


def test_as_dict_keeps_ignored_sections_and_the_effective_length():
    raw = {"searcher": {"max_steps": 9}, "resources": {"slots_per_trial": 2}, "labels": ["a"]}
    d = parse_config(raw).as_dict()
    assert d["resources"] == {"slots_per_trial": 2}
    assert d["labels"] == ["a"]
    assert d["searcher"]["max_length"] == {"batches": 900}
    assert "max_steps" not in d["searcher"]
    d["resources"]["slots_per_trial"] = 5  # a copy: user code cannot change the config
    assert raw["resources"] == {"slots_per_trial": 2}


# PEDL steps: searcher.max_steps and integer periods count batches_per_step batches


@pytest.mark.parametrize("steps,bps", [(9, 100), (1, 1), (3, 7)])
def test_max_steps_times_batches_per_step_is_the_length(steps, bps):
    cfg = parse_config({"searcher": {"max_steps": steps}, "batches_per_step": bps})
    assert cfg.searcher.max_length == Length("batches", steps * bps)
    assert cfg.batches_per_step == bps


def test_batches_per_step_defaults_to_100():
    cfg = parse_config({"searcher": {"max_steps": 9}})
    assert cfg.batches_per_step == 100
    assert cfg.searcher.max_length == Length("batches", 900)


def test_max_length_still_works_and_ignores_batches_per_step():
    cfg = parse_config({"searcher": {"max_length": {"epochs": 2}}, "batches_per_step": 10})
    assert cfg.searcher.max_length == Length("epochs", 2)


def test_max_steps_and_max_length_together_is_an_error_naming_both():
    with pytest.raises(HarnessError) as e:
        parse_config({"searcher": {"max_steps": 9, "max_length": {"batches": 900}}}, "c.yaml")
    msg = str(e.value)
    assert msg.startswith("c.yaml: ")
    assert "'searcher.max_steps'" in msg
    assert "'searcher.max_length'" in msg


@pytest.mark.parametrize("key", ["min_validation_period", "min_checkpoint_period"])
@pytest.mark.parametrize("n,bps", [(3, 100), (1, 7), (5, 1)])
def test_integer_periods_count_steps(key, n, bps):
    cfg = parse_config({key: n, "batches_per_step": bps})
    assert getattr(cfg, key) == Length("batches", n * bps)


@pytest.mark.parametrize("key", ["min_validation_period", "min_checkpoint_period"])
@pytest.mark.parametrize("period", [{"batches": 5}, {"epochs": 2}, {"records": 640}])
def test_period_mappings_keep_working(key, period):
    ((unit, n),) = period.items()
    assert getattr(parse_config({key: period, "batches_per_step": 7}), key) == Length(unit, n)


@pytest.mark.parametrize("bps", [1, 10, 100, 250])
def test_scheduling_unit_defaults_to_batches_per_step(bps):
    assert parse_config({"batches_per_step": bps}).scheduling_unit == bps


@pytest.mark.parametrize("bps,unit", [(10, 3), (100, 100), (1, 50)])
def test_explicit_scheduling_unit_wins(bps, unit):
    assert parse_config({"batches_per_step": bps, "scheduling_unit": unit}).scheduling_unit == unit


# checkpoint_policy


@pytest.mark.parametrize("policy", ["best", "all", "none"])
def test_checkpoint_policy_values(policy):
    assert parse_config({"checkpoint_policy": policy}).checkpoint_policy == policy
    assert parse_config({}).checkpoint_policy == "best"


@pytest.mark.parametrize("policy", ["always", "Best", ""])
def test_bad_checkpoint_policy_lists_the_three(policy):
    with pytest.raises(HarnessError) as e:
        parse_config({"checkpoint_policy": policy}, "c.yaml")
    msg = str(e.value)
    assert msg.startswith("c.yaml: config key 'checkpoint_policy': expected one of best, all, none")
    assert repr(policy) in msg


# Search configs: refused, saying what to run instead


@pytest.mark.parametrize(
    "name", ["random", "grid", "adaptive", "adaptive_simple", "adaptive_asha", "pbt", "custom"]
)
def test_search_searcher_says_what_to_run_instead(name):
    raw = {"searcher": {"name": name, "metric": "loss", "max_trials": 16, "max_steps": 9, "mode": "standard"}}
    with pytest.raises(HarnessError) as e:
        parse_config(raw, "adaptive.yaml")
    assert str(e.value) == (
        f"adaptive.yaml: config key 'searcher.name': '{name}' is a hyperparameter search: run it with "
        "`harness search MODEL_DIR --config FILE --output OUT` (to train one trial, use searcher.name: "
        "single with one value per hyperparameter)"
    )


def test_unknown_searcher_name_is_an_error():
    known = r"\(known: single, random, grid, adaptive, adaptive_simple, adaptive_asha\)"
    with pytest.raises(HarnessError, match=r"'searcher\.name': unknown searcher 'singel' " + known):
        parse_config({"searcher": {"name": "singel"}})


# A PEDL-era const.yaml loads unchanged

PEDL_CONST_YAML = """
description: mnist_pytorch_const
data:
  url: https://s3-us-west-2.amazonaws.com/determined-ai-test-data/pytorch_mnist.tar.gz
hyperparameters:
  learning_rate: 1.0
  global_batch_size: 64
  n_filters1: 32
  n_filters2: 64
  dropout1: 0.25
  dropout2: 0.5
searcher:
  name: single
  metric: validation_loss
  max_steps: 9
  smaller_is_better: true
batches_per_step: 100
min_validation_period: 3
checkpoint_storage:
  type: shared_fs
  host_path: /tmp
  storage_path: pedl-checkpoints
  save_trial_best: 1
resources:
  slots_per_trial: 2
environment:
  image: pedl/pytorch:latest
bind_mounts:
  - host_path: /data
    container_path: /data
data_layer:
  type: shared_fs
checkpoint_policy: best
"""


def test_pedl_era_const_yaml_loads(tmp_path):
    path = write(tmp_path, PEDL_CONST_YAML, "const.yaml")
    cfg = load_config(path)
    assert cfg.description == "mnist_pytorch_const"
    assert cfg.hyperparameters["global_batch_size"] == 64
    assert cfg.searcher == SearcherConfig("single", "validation_loss", True, Length("batches", 900))
    assert cfg.batches_per_step == 100
    assert cfg.scheduling_unit == 100
    assert cfg.min_validation_period == Length("batches", 300)
    assert cfg.checkpoint_policy == "best"
    assert cfg.checkpoint_storage.save_trial_best == 1
    assert cfg.slots_per_trial == 2
    assert cfg.warnings == [
        f"{path}: ignoring cluster settings: checkpoint_storage.type/host_path/storage_path "
        "(checkpoints go to --output), resources (ranks come from the launcher), "
        "environment (this machine's environment is used), bind_mounts (mount volumes yourself), "
        "data_layer (data is read directly)"
    ]
    d = cfg.as_dict()
    assert d["resources"] == {"slots_per_trial": 2}
    assert d["environment"] == {"image": "pedl/pytorch:latest"}
    assert parse_config(d) == cfg


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999999999999])
def test_a_seed_numpy_cannot_take_is_refused_naming_the_key(seed):
    """NumPy seeds are 32-bit: -1 and 2**32-1 would wrap to the same run, a huge one overflowed in torch."""
    with pytest.raises(HarnessError) as e:
        parse_config({"reproducibility": {"experiment_seed": seed}})
    assert str(e.value).endswith(
        f"config key 'reproducibility.experiment_seed': expected an integer from 0 to 4294967295, got {seed}"
    )
    assert parse_config({"reproducibility": {"experiment_seed": 2**32 - 1}}).reproducibility.experiment_seed
