"""Config limits (harness.yaml_load): anchors, size, depth, duplicate keys, binary and non-UTF-8 files.

Each refusal is one line naming the file (and the line where there is one), comes in well under a second,
and reaches the user as `harness: error: ...` with exit status 2.
"""

import glob
import os
import time
import tracemalloc

import pytest
import runner
import yaml

from harness.config import load_config
from harness.config.yaml12 import MAX_BYTES, MAX_DEPTH, load_yaml_file
from harness.errors import HarnessError
from harness.search.space import parse_search

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(tmp_path, content, name="experiment.yaml"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def refused(path, load=load_config, seconds=1.0):
    """The one-line message of the HarnessError that loading `path` raises, checked to come fast."""
    start = time.perf_counter()
    with pytest.raises(HarnessError) as e:
        load(path)
    elapsed = time.perf_counter() - start
    message = str(e.value)
    assert elapsed < seconds, f"took {elapsed:.2f}s: {message}"
    assert "\n" not in message
    assert message.startswith(path)
    return message


def alias_bomb(levels=9, width=10):
    """Billion laughs: `width ** levels` leaves from a few hundred bytes, shared by reference."""
    names = "abcdefghijklmnop"
    lines = ["description: ok", "hyperparameters:", f"  a: &a [{', '.join(['lol'] * width)}]"]
    for prev, name in zip(names, names[1:levels]):
        lines.append(f"  {name}: &{name} [{', '.join(['*' + prev] * width)}]")
    return "\n".join(lines) + "\n"


# Anchors and aliases


def test_alias_bomb_is_refused_fast_and_small(tmp_path):
    text = alias_bomb()
    assert len(text) < 800
    path = write(tmp_path, text)
    tracemalloc.start()
    try:
        message = refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20, f"peak {peak:,} bytes"
    assert message == (
        f"{path} line 3: YAML anchors and aliases (&x / *x) are not accepted in configs (found &a); "
        "write the values out"
    )


def test_alias_bomb_would_load_without_the_limit(tmp_path):
    # What the limit prevents: the plain safe loader accepts the bomb (10**9 leaves once expanded).
    data = yaml.safe_load(alias_bomb())
    assert len(data["hyperparameters"]["i"]) == 10


@pytest.mark.parametrize(
    "text, line, found",
    [
        ("name: x\nhyperparameters:\n  lr: &lr 0.1\n", 3, "&lr"),  # a single, harmless anchor: refused too
        ("searcher:\n  metric: &m loss\n  name: single\n", 2, "&m"),
        ("name: x\ndescription: *undefined\n", 2, "*undefined"),
        ("base: &base {lr: 1}\nhyperparameters:\n  <<: *base\n", 1, "&base"),  # merge keys need aliases
    ],
)
def test_any_anchor_or_alias_is_refused(tmp_path, text, line, found):
    path = write(tmp_path, text)
    message = refused(path)
    assert message.startswith(f"{path} line {line}: YAML anchors and aliases")
    assert f"(found {found})" in message


# Size


def test_50_mb_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "experiment.yaml"
    with open(path, "w") as f:
        f.write("hyperparameters:\n")
        chunk = "".join(f"  key_{i:08d}: 1\n" for i in range(1 << 16))  # 1 MB of valid YAML
        for _ in range(50):
            f.write(chunk)
        f.truncate(50 << 20)
    message = refused(str(path), seconds=0.2)
    assert message == (
        f"{path}: the config file is 50.0 MB (52,428,800 bytes), over the 1 MB limit for a config; "
        "is it the right file?"
    )


def test_size_limit_is_exact(tmp_path):
    comment = "# " + "x" * 97 + "\n"
    body = "name: big\n" + comment * ((MAX_BYTES - 10) // len(comment))
    body += "#" * (MAX_BYTES - len(body) - 1) + "\n"
    assert len(body) == MAX_BYTES
    assert load_config(write(tmp_path, body)).name == "big"
    message = refused(write(tmp_path, body + "\n", "over.yaml"))
    assert "(1,048,577 bytes)" in message


# Depth


def nested_mappings(depth):
    """Block mappings `depth` levels deep; the top-level mapping is level 1, mapping k starts on line k."""
    return "".join("  " * level + "a:\n" for level in range(depth - 1)) + "  " * (depth - 1) + "a: 1\n"


def test_depth_32_is_accepted_and_33_refused(tmp_path):
    ok = load_yaml_file(write(tmp_path, nested_mappings(MAX_DEPTH)))
    for _ in range(MAX_DEPTH - 1):
        ok = ok["a"]
    assert ok == {"a": 1}
    message = refused(write(tmp_path, nested_mappings(MAX_DEPTH + 1), "deep.yaml"), load_yaml_file)
    assert message.endswith(" line 33: nested deeper than 32 levels; flatten the config")


def test_depth_counts_lists_and_flow_style(tmp_path):
    data = "data: {x: " + "[" * (MAX_DEPTH - 2) + "1" + "]" * (MAX_DEPTH - 2) + "}\n"
    value = load_config(write(tmp_path, data)).data["x"]
    for _ in range(MAX_DEPTH - 2):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == 1
    too_deep = data.replace("[", "[[", 1).replace("]", "]]", 1)
    message = refused(write(tmp_path, too_deep, "deep.yaml"))
    assert message.endswith(" line 1: nested deeper than 32 levels; flatten the config")


def test_very_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    path = write(tmp_path, "data: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "nested deeper than 32 levels" in refused(path)


# Duplicate keys


def test_duplicate_top_level_key_names_key_and_both_lines(tmp_path):
    path = write(tmp_path, "name: first\ndescription: d\nname: second\n")
    assert refused(path) == (
        f"{path} line 3: duplicate key 'name' at the top level (line 3; first at line 1); "
        "a config sets each key once"
    )


def test_duplicate_nested_key_names_where(tmp_path):
    text = "hyperparameters:\n  lr: 0.1\n  hidden: 64\n  optim:\n    momentum: 0.9\n  lr: 0.01\n"
    path = write(tmp_path, text)
    assert refused(path) == (
        f"{path} line 6: duplicate key 'lr' in hyperparameters (line 6; first at line 2); "
        "a config sets each key once"
    )


@pytest.mark.parametrize(
    "text, key, where",
    [
        ("searcher: {name: single, name: single}\n", "'name'", "in searcher (line 1; first at line 1)"),
        ("data:\n  1: a\n  0x1: b\n", "1", "in data (line 3; first at line 2)"),  # the same int
        ("data:\n  - {x: 1}\n  - {y: 2, y: 3}\n", "'y'", "in data.[1] (line 3; first at line 3)"),
    ],
)
def test_duplicate_keys_are_compared_as_values(tmp_path, text, key, where):
    message = refused(write(tmp_path, text))
    assert f"duplicate key {key} {where}" in message


def test_same_key_in_different_mappings_is_fine(tmp_path):
    text = "hyperparameters:\n  lr: 0.1\n  a: {lr: 1}\ndata:\n  lr: 2\n  items: [{lr: 3}, {lr: 4}]\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.data == {"lr": 2, "items": [{"lr": 3}, {"lr": 4}]}


# Binary and undecodable files


def test_binary_file_is_refused(tmp_path):
    path = write(tmp_path, b"name: x\n\x00\x01\x02\x89PNG\r\n")
    assert refused(path) == (
        f"{path}: binary file, not a YAML config (NUL byte at offset 8, line 2); is it the right file?"
    )


def test_latin1_file_is_refused_naming_line_and_offset(tmp_path):
    path = write(tmp_path, "name: x\ndescription: caf\u00e9\n".encode("latin-1"))
    assert refused(path) == (
        f"{path} line 2: not UTF-8 text (byte 0xe9 at offset 24); save the config as UTF-8"
    )


def test_utf16_file_is_refused(tmp_path):
    path = write(tmp_path, "name: x\n".encode("utf-16"))
    assert "UTF-16 or UTF-32 text" in refused(path)


def test_control_character_is_invalid_yaml_in_one_line(tmp_path):
    path = write(tmp_path, "name: x\ndescription: a\x01b\n")
    assert refused(path) == f"{path} line 2: invalid YAML: unacceptable character #x0001"


def test_utf8_with_bom_and_non_ascii_loads(tmp_path):
    path = write(tmp_path, "\ufeffname: caf\u00e9\n")
    assert load_config(path).name == "caf\u00e9"


# Valid configs load as before


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "samples", "*", "*.yaml"))))
def test_sample_configs_load_as_pedl_and_determined_read_them(path):
    from ruamel.yaml import YAML  # YAML 1.2, what PEDL's and Determined's tools read configs with

    with open(path) as f:
        assert load_yaml_file(path) == YAML(typ="safe", pure=True).load(f)
    raw = load_yaml_file(path)
    if " " in str(raw.get("entrypoint", "")):  # a Determined Trainer script's: run with python, said so
        with pytest.raises(HarnessError, match=r"a Determined Trainer script; run it as it is with `python "):
            load_config(path)
    elif raw.get("searcher", {}).get("name", "single") != "single":
        parse_search(raw, path)  # a search config (harness search)
    else:
        load_config(path)


def test_explicit_key_syntax_loads(tmp_path):
    # `? key` / `: value`: PyYAML's scanner calls its own check_key(); the loader's duplicate-key check
    # once shadowed it and crashed with a TypeError
    path = write(tmp_path, "description: ok\n? name\n: explicit\n")
    assert load_config(path).name == "explicit"
    assert "duplicate key 'name'" in refused(write(tmp_path, "? name\n: a\nname: b\n"))


def test_pedl_const_yaml_loads(tmp_path):
    text = (
        "description: mnist\nhyperparameters:\n  global_batch_size: 64\n  learning_rate: 0.01\n"
        "  dropout: {type: const, val: 0.5}\nsearcher:\n  name: single\n  metric: validation_error\n"
        "  max_steps: 3\nbatches_per_step: 10\nmin_validation_period: 1\n"
        "resources:\n  slots_per_trial: 1\n"
    )
    cfg = load_config(write(tmp_path, text, "const.yaml"))
    assert cfg.hyperparameters["dropout"] == 0.5
    assert cfg.searcher.max_length.value == 30


# Through the CLI


@pytest.mark.integration  # starts the harness (or a script) as its own process
def test_cli_refuses_a_config_bomb_in_one_line_with_status_2(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_def.py").write_text("import harness\n")
    (model_dir / "experiment.yaml").write_text(alias_bomb())
    proc = runner.run(
        runner.harness(model_dir, "--output", tmp_path / "out"), 120, {"PYTHONPATH": ROOT}, cwd=ROOT
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("harness: error:")]
    assert errors == [
        f"harness: error: {model_dir}/experiment.yaml line 3: YAML anchors and aliases (&x / *x) are not "
        "accepted in configs (found &a); write the values out"
    ]
    assert "Traceback" not in proc.stderr
