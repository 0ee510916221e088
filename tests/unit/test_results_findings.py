"""Issue 26's findings on results, checkpoints and metrics files, in one process: reading a damaged
metrics.jsonl, `harness summary` / `plot` of what is in it, the one-line errors of `harness export` and of a
checkpoint that holds objects other than tensors, the earlier runs kept, the record count of a batch whose
tensors disagree, and trials loaded side by side."""

import json
import os

import pytest
import torch

from harness.errors import HarnessError
from harness.output import checkpoint
from harness.results import evaluate


def report(kind, b, **metrics):
    return {"type": kind, "batches": b, "epoch": b / 10, "records": b * 20, "time": 0.0, "metrics": metrics}


def write_lines(path, lines):
    path.write_bytes(b"".join(lines))


def line(entry):
    return json.dumps(entry).encode() + b"\n"


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
