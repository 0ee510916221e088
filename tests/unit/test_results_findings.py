"""Issue 26's findings on results, checkpoints and metrics files, in one process: reading a damaged
metrics.jsonl, `harness summary` / `plot` of what is in it, the one-line errors of `harness export` and of a
checkpoint that holds objects other than tensors, the earlier runs kept, the record count of a batch whose
tensors disagree, and trials loaded side by side."""

import json
import os

import pytest
import torch
from conftest import GOOD_CONFIG, write_model_def
from determined_defs import CONTEXT_DEF

from harness import config, definition, distributed
from harness.api.trial import get_hyperparameter
from harness.errors import HarnessError
from harness.output import checkpoint, reports
from harness.results import evaluate
from harness.results import summary as tools
from harness.train import batches, loop


def report(kind, b, **metrics):
    return {"type": kind, "batches": b, "epoch": b / 10, "records": b * 20, "time": 0.0, "metrics": metrics}


def write_lines(path, lines):
    path.write_bytes(b"".join(lines))


def line(entry):
    return json.dumps(entry).encode() + b"\n"


# ----------------------------------------------------------------------------------------------------------
# metrics.jsonl: damaged lines are skipped, counted and named; the others are kept


def test_damaged_lines_are_skipped_and_named_with_their_line_numbers(tmp_path, capsys):
    good = [report("training", b, loss=1.0 / b) for b in (1, 2, 3)]
    damaged = line(report("validation", 2, accuracy=0.5)).replace(b"accuracy", b"accur\xffcy")
    write_lines(
        tmp_path / "metrics.jsonl",
        [line(good[0]), damaged, b"[1, 2]\n", line(good[1]), b"{not json\n", line(good[2]), b'{"type": "tr'],
    )
    column = damaged.index(b"\xff") + 1
    entries, bad = reports.read_checked(str(tmp_path))
    assert entries == good  # the torn last line (a killed writer) is neither kept nor counted
    assert bad == [
        (2, f"not UTF-8 (byte 0xff at column {column})"),
        (3, "a JSON list, not an object"),
        (5, "not JSON"),
    ]
    assert reports.read_reports(str(tmp_path)) == good
    err = capsys.readouterr().err
    assert err == (
        f"harness: warning: {tmp_path}/metrics.jsonl: skipped 3 unreadable lines (line 2: not UTF-8 (byte "
        f"0xff at column {column}); line 3: a JSON list, not an object; line 5: not JSON); kept the 3 "
        "readable reports\n"
    )


def test_a_complete_last_report_without_its_newline_is_kept_and_a_clean_file_is_silent(tmp_path, capsys):
    entries = [report("training", 1, loss=1.0), report("validation", 1, accuracy=0.5)]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(entries[0]) + "\n" + json.dumps(entries[1]))
    assert reports.read_reports(str(tmp_path)) == entries
    assert capsys.readouterr().err == ""


def test_a_line_that_is_not_a_report_is_named_and_many_are_summed_up(tmp_path):
    bad = [(n, "not JSON") for n in range(1, 6)]
    message = reports.unreadable_message(str(tmp_path), bad, 7)
    assert message == (
        f"{tmp_path}/metrics.jsonl: skipped 5 unreadable lines (line 1: not JSON; line 2: not JSON; line 3: "
        "not JSON; and 2 more); kept the 7 readable reports"
    )
    write_lines(tmp_path / "metrics.jsonl", [b'{"type": "training", "batches": "7", "metrics": {}}\n'])
    assert reports.read_checked(str(tmp_path)) == ([], [(1, "not a report ('batches' is not an integer)")])


def test_summary_and_plot_of_a_damaged_file_warn_once_and_go_on(tmp_path, capsys):
    lines = [line(report("training", b, loss=1.0 / b, lr=0.1 / b)) for b in (1, 2, 3)]
    lines += [line(report("validation", b, accuracy=b / 4, loss=1.0 / b)) for b in (2, 3)]
    lines.insert(2, b"\x80\x81 garbage\n")
    write_lines(tmp_path / "metrics.jsonl", lines)
    assert tools.main(["summary", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "metrics.jsonl: skipped 1 unreadable line (line 3: not UTF-8" in err
    assert "accuracy  0.75" in out and "trained: 3 batches" in out
    assert tools.main(["plot", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path}/curves.png\n" and err.count("\n") == 1 and "line 3" in err


# ----------------------------------------------------------------------------------------------------------
# summary shows non-scalar metrics; plot draws validation metrics and the learning rate


def test_summary_shows_a_non_scalar_metric_by_its_shape(tmp_path, capsys):
    entries = [
        report("validation", 10, accuracy=0.5, per_class=[0.1] * 10, confusion=[[1, 2, 3], [4, 5, 6]]),
        report("validation", 20, accuracy=0.7, per_class=[0.2] * 10, confusion=[[1, 2, 3], [4, 5, 6]]),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert tools.main(["summary", str(tmp_path)]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()]
    assert ["confusion", "[2x3", "values]", "20"] in rows
    assert ["per_class", "[10", "values]", "20"] in rows
    assert ["accuracy", "0.7", "20", "0.5", "0.7"] in rows


def test_plot_draws_the_losses_together_each_validation_metric_and_the_learning_rate():
    entries = [report("training", 1, loss=2.0, accuracy=0.3, lr=0.1, grad_norm=4.0)]
    entries += [report("validation", 1, validation_loss=1.5, accuracy=0.4, f1=0.2)]
    assert tools.plot_panels(entries) == [
        ("loss", [("training", "loss", "training"), ("validation", "validation_loss", "validation")]),
        ("accuracy", [("training", "accuracy", "training"), ("validation", "accuracy", "validation")]),
        ("validation f1", [("validation", "f1", "validation")]),
        ("training grad_norm", [("training", "grad_norm", "training")]),
        ("learning rate (lr)", [("training", "lr", "lr")]),
    ]


# ----------------------------------------------------------------------------------------------------------
# checkpoints: a refused payload, and export's target


class Payload:
    pass


def test_a_checkpoint_file_with_other_objects_than_tensors_is_one_line_naming_it(tmp_path):
    path = str(tmp_path / "model.pt")
    torch.save({"w": torch.zeros(2), "extra": Payload()}, path)
    with pytest.raises(HarnessError) as e:
        checkpoint.load_tensors(path)
    assert str(e.value) == (
        f"checkpoint file {path} holds objects other than tensors ({__name__}.Payload); not loaded, for "
        "safety: a checkpoint is loaded as data (tensors, numbers, strings, lists, dicts), never as code"
    )
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_export_refuses_an_existing_file_a_folder_and_a_file_as_folder(tmp_path):
    existing = tmp_path / "w.pt"
    existing.write_text("keep me")
    with pytest.raises(HarnessError, match=f"^--out {existing} exists; pass --force to overwrite it$"):
        evaluate.export_target(str(existing), force=False)
    assert evaluate.export_target(str(existing), force=True) == str(existing)
    with pytest.raises(HarnessError, match=f"^--out {tmp_path} is a folder; name the file to write$"):
        evaluate.export_target(str(tmp_path), force=True)
    with pytest.raises(HarnessError, match=f"^--out {existing}/m.pt: {existing} is a file, not a folder$"):
        evaluate.export_target(str(existing / "m.pt"), force=False)
    assert evaluate.export_target(str(tmp_path / "new" / "m.pt"), force=False) == str(tmp_path / "new/m.pt")


def test_a_failed_export_write_leaves_the_file_as_it_was_and_no_half_file(tmp_path):
    target = tmp_path / "w.pt"
    target.write_text("the earlier export")

    def torch_fails(tmp):  # as torch.save reports a read-only file system: a RuntimeError of many lines
        open(tmp, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:747] . unexpected pos 64 vs 0\nmore")

    with pytest.raises(HarnessError) as e:
        evaluate.write_atomic(str(target), torch_fails)
    assert str(
        e.value
    ) == f"cannot write {target}: RuntimeError: [enforce fail at inline_container.cc:747]" + (
        " . unexpected pos 64 vs 0"
    )
    assert target.read_text() == "the earlier export" and os.listdir(tmp_path) == ["w.pt"]
    evaluate.write_atomic(str(target), lambda tmp: torch.save({"w": torch.ones(1)}, tmp))
    assert torch.load(target, weights_only=True)["w"].item() == 1.0 and os.listdir(tmp_path) == ["w.pt"]
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's


# ----------------------------------------------------------------------------------------------------------
# earlier runs moved aside: the newest three are kept


def test_only_the_newest_three_earlier_runs_are_kept(tmp_path, capsys):
    names = ["previous-20261130-090000", "previous-20261201-100000", "previous-20261201-100000-1"]
    names += ["previous-20261201-100000-2", "previous-notatime"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "metrics.jsonl").write_text(json.dumps(report("training", 1, loss=1.0)) + "\n")
    plan = checkpoint.prepare_output(str(tmp_path), fresh=True, resume_from=None)
    plan.start()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"harness: --fresh: moved the earlier run in {tmp_path} to {tmp_path}/previous-")
    assert out[1] == (
        "harness: removed the oldest earlier run(s) previous-20261130-090000, previous-20261201-100000 "
        f"from {tmp_path} (the newest 3 previous-<time>/ folders are kept)"
    )
    kept = sorted(n for n in os.listdir(tmp_path) if n.startswith("previous-"))
    assert len(kept) == 4 and "previous-notatime" in kept and "previous-20261201-100000-2" in kept


# ----------------------------------------------------------------------------------------------------------
# the record count of a batch whose tensors disagree


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(batches, "_warned_disagreement", False)


def test_tensors_that_disagree_on_the_records_are_said_once(fresh_warning, capsys):
    inputs = {"ids": torch.zeros(8, 5), "mask": torch.zeros(8, 5), "table": torch.zeros(100, 4)}
    assert batches.batch_records(inputs, None, "training batch 1") == 8
    assert batches.batch_records(inputs, None, "training batch 2") == 8
    assert capsys.readouterr().err == (
        "harness: warning: the tensors of training batch 1 input disagree on their first dimension (training "
        "batch 1 input['ids'] 8, training batch 1 input['mask'] 8, training batch 1 input['table'] 100); the "
        "harness counts 8 records per such batch, the first tensor's (records weight validation metrics and "
        "count toward epochs): put the records along the first dimension of the first tensor\n"
    )


def test_tensors_that_agree_are_counted_silently(fresh_warning, capsys):
    assert batches.batch_records({"a": torch.zeros(4, 2), "b": [torch.zeros(4)]}, None, "b") == 4
    assert batches.batch_records(torch.zeros(3, 2), {"t": torch.zeros(3), "s": torch.tensor(1.0)}, "b") == 3
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------------
# two trials loaded side by side: each context answers for its own checkpoint

HPARAM_DEF = CONTEXT_DEF.replace(
    "        self.model = context.wrap_model(net())",
    '        hidden = context.get_hparam("hidden")\n'
    "        self.model = context.wrap_model(\n"
    "            nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))\n"
    "        )",
)


def test_two_loaded_trials_keep_their_own_hyperparameters(tmp_path, forget_modules):
    ckpts = []
    for hidden in (8, 12):
        text = GOOD_CONFIG.replace("batch: 20", f"global_batch_size: 20\n  hidden: {hidden}")
        text = text.replace("{batches: 6}", "{batches: 2}")
        directory = write_model_def(tmp_path / f"def{hidden}", model_def=HPARAM_DEF, data=None, config=text)
        cfg = config.load_config(config.find_config_file(directory))
        loop.train(
            definition.load(directory, cfg.entrypoint),
            cfg,
            str(tmp_path / f"out{hidden}"),
            distributed.Local(),
        )
        ckpts.append(str(tmp_path / f"out{hidden}"))
    first, _ = evaluate.load_trial(ckpts[0])
    second, _ = evaluate.load_trial(ckpts[1])
    assert first.context.get_hparam("hidden") == 8 and second.context.get_hparam("hidden") == 12
    assert first.context.get_hparams()["hidden"] == 8
    with pytest.raises(HarnessError, match="hyperparameter 'nope' is not in the config's hyperparameters"):
        first.context.get_hparam("nope")


def test_two_loaded_pedl_trials_answer_get_hyperparameter_for_their_own_checkpoint(tmp_path, forget_modules):
    ckpts = []
    for batch in (20, 10):
        text = GOOD_CONFIG.replace("batch: 20", f"batch: {batch}").replace("{batches: 6}", "{batches: 2}")
        directory = write_model_def(tmp_path / f"def{batch}", config=text)
        cfg = config.load_config(config.find_config_file(directory))
        loop.train(definition.load(directory), cfg, str(tmp_path / f"out{batch}"), distributed.Local())
        ckpts.append(str(tmp_path / f"out{batch}"))
    first, _ = evaluate.load_trial(ckpts[0])
    second, _ = evaluate.load_trial(ckpts[1])
    assert (first.batch_size(), second.batch_size(), first.batch_size()) == (20, 10, 20)
    assert get_hyperparameter("batch") == 10  # outside the trials' methods: the checkpoint loaded last
