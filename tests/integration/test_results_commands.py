"""Issue 26's findings on results, checkpoints and metrics files, through the real commands: `harness export`
to places it cannot or must not write, a checkpoint holding objects other than tensors, `harness summary`,
`plot` and a resume with a damaged metrics.jsonl line (under horovodrun), and the earlier runs kept."""

import argparse
import json
import os

import runner
import torch
from conftest import write_model_def

from harness import config, definition, distributed
from harness.output import checkpoint
from harness.train import loop


def train_here(directory, output):
    """Train the conftest definition (6 batches) in this process: the commands under test read its output."""
    cfg = config.load_config(config.find_config_file(str(directory)))
    loop.train(definition.load(str(directory)), cfg, str(output), distributed.Local())
    return os.path.join(str(output), "checkpoints", "6")


def one_line_error(proc, text):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"harness: error: {text}\n", proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_export_to_a_place_it_cannot_or_must_not_write_is_one_line(model_dir, tmp_path):
    write_model_def(model_dir)
    ckpt = train_here(model_dir, tmp_path / "out")
    proc = runner.run(runner.harness("export", ckpt, "--format", "state_dict", "--out", "/proc/version"))
    one_line_error(proc, "--out /proc/version exists; pass --force to overwrite it")
    # --model-dir: no line saying which definition is imported (load_trial's provenance) before the error
    args = (
        "export",
        ckpt,
        "--model-dir",
        model_dir,
        "--format",
        "torchscript",
        "--out",
        "/proc/version",
        "--force",
    )
    proc = runner.run(runner.harness(*args))
    assert proc.returncode == 2 and proc.stderr.startswith("harness: error: cannot write /proc/version: ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr

    target = tmp_path / "exported" / "w.pt"
    target.parent.mkdir()
    target.write_text("an earlier export")
    proc = runner.run(runner.harness("export", ckpt, "--format", "state_dict", "--out", target, "--force"))
    assert (proc.returncode, proc.stdout) == (0, f"{target}\n"), proc.stderr
    assert os.listdir(target.parent) == ["w.pt"]  # renamed into place: no temporary file left beside it
    assert set(torch.load(target, weights_only=True)) == set(
        torch.load(f"{ckpt}/model.pt", weights_only=True)
    )


def test_a_checkpoint_holding_other_objects_than_tensors_is_one_line_naming_it(model_dir, tmp_path):
    write_model_def(model_dir)
    ckpt = train_here(model_dir, tmp_path / "out")
    weights = torch.load(f"{ckpt}/model.pt", weights_only=True)
    torch.save({**weights, "extra": argparse.Namespace(note="not a tensor")}, f"{ckpt}/model.pt")
    manifest = json.load(open(f"{ckpt}/manifest.json"))
    manifest["files"]["model.pt"] = checkpoint.sha256_file(f"{ckpt}/model.pt")  # well-formed, checksums agree
    json.dump(manifest, open(f"{ckpt}/manifest.json", "w"))
    export = ("export", ckpt, "--model-dir", model_dir, "--format", "state_dict", "--out", tmp_path / "w.pt")
    proc = runner.run(runner.harness(*export))
    one_line_error(
        proc,
        f"checkpoint file {ckpt}/model.pt holds objects other than tensors (argparse.Namespace); not loaded, "
        "for safety: a checkpoint is loaded as data (tensors, numbers, strings, lists, dicts), never as code",
    )
    assert "weights_only=False" not in proc.stderr and not (tmp_path / "w.pt").exists()


def test_summary_plot_and_a_resume_go_on_past_a_damaged_metrics_line(model_dir, tmp_path):
    write_model_def(model_dir)
    output = tmp_path / "out"
    train_here(model_dir, output)
    path = output / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:20] + b"\xe9" + lines[1][20:]  # a Latin-1 byte inside the second report
    path.write_bytes(b"\n".join(lines))
    readable = len([x for x in lines if x]) - 1
    warning = (
        f"harness: warning: {path}: skipped 1 unreadable line (line 2: not UTF-8 (byte 0xe9 at column 21)); "
        f"kept the {readable} readable reports\n"
    )

    proc = runner.run(runner.harness("summary", output), timeout=60)
    assert (proc.returncode, proc.stderr) == (0, warning) and "accuracy" in proc.stdout
    proc = runner.run(runner.harness("plot", output), timeout=60)
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, warning, f"{output}/curves.png\n")

    # Training further (an allowed change): the state comes from the checkpoint, the readable reports stay.
    experiment = model_dir / "experiment.yaml"
    experiment.write_text(experiment.read_text().replace("{batches: 6}", "{batches: 9}"))
    proc = runner.run(runner.training("gloo", 2, model_dir, output))
    runner.assert_ok(proc)
    assert proc.stderr.count(f"{path}: skipped 1 unreadable line (line 2: not UTF-8") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    entries = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert entries[-1]["batches"] == 9 and len(entries) == readable + 2  # one more training, one validation

    # A fresh start moves this run aside and keeps the newest three earlier runs.
    for stamp in ("20261101-000000", "20261102-000000", "20261103-000000"):
        (output / f"previous-{stamp}").mkdir()
    proc = runner.run(runner.training("local", 1, model_dir, output, "--fresh"))
    runner.assert_ok(proc)
    assert (
        f"harness: removed the oldest earlier run(s) previous-20261101-000000 from {output} (the newest 3 "
        "previous-<time>/ folders are kept)\n"
    ) in proc.stdout
    assert len([n for n in os.listdir(output) if n.startswith("previous-")]) == 3
