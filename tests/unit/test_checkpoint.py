"""Checkpoints in one process: contents, corrupt ones skipped, retention, data-only loading, outputs."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import GOOD_CONFIG, GOOD_MODEL_DEF, write_model_def

from harness import config, definition, distributed
from harness.errors import HarnessError
from harness.output import checkpoint
from harness.results import summary as tools
from harness.train import loop

CONFIG = GOOD_CONFIG.replace(
    "{batches: 6}", "{batches: 6}\n  metric: accuracy\n  smaller_is_better: false"
) + (
    "min_checkpoint_period: {batches: 2}\nmin_validation_period: {batches: 2}\n"
    "checkpoint_storage: {save_trial_latest: 3, save_trial_best: 0}\n"
)


def train(directory, output, **kwargs):
    cfg = config.load_config(config.find_config_file(str(directory)))
    return loop.train(definition.load(str(directory)), cfg, str(output), distributed.Local(), **kwargs)


def set_length(directory, batches):
    path = os.path.join(directory, "experiment.yaml")
    text = open(path).read().replace("{batches: 6}", f"{{batches: {batches}}}")
    open(path, "w").write(text)


def test_checkpoint_contents(model_dir, tmp_path):
    write_model_def(model_dir, config=CONFIG)
    train(model_dir, tmp_path)
    root = tmp_path / "checkpoints"
    assert checkpoint.checkpoint_dirs(str(root)) == [6, 4, 2]
    assert open(root / "latest").read().strip() == "6"
    assert sorted(os.listdir(root / "6")) == [
        "manifest.json",
        "model.pt",
        "optimizer.pt",
        "state.json",
        "trainer.pt",
    ]
    ckpt = checkpoint.load(str(root / "6"))
    assert ckpt.state["progress"] == {"batches": 6, "records": 120, "epoch_index": 0, "batch_in_epoch": 6}
    assert ckpt.state["hparams"] == {"batch": 20} and ckpt.state["seed"] == 1
    assert set(ckpt.state["validation_metrics"]) == {"accuracy", "loss"}
    assert set(ckpt.trainer["rng"][0]) == {"now", "epoch_start", "grads"}
    assert ckpt.trainer["rng"][0]["grads"] is None  # not in mid aggregation window
    assert set(ckpt.trainer["rng"][0]["now"]) == {"python", "numpy", "torch", "cuda"}
    assert "1.weight" in ckpt.model and ckpt.optimizer["param_groups"][0]["lr"] == 0.1
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]


def test_rng_round_trip():
    state = checkpoint.capture_rng()
    a = (np.random.rand(), torch.rand(3), __import__("random").random())
    checkpoint.restore_rng(state)
    b = (np.random.rand(), torch.rand(3), __import__("random").random())
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_torch_only_rng_restores_torch_and_leaves_the_others():
    state = checkpoint.capture_rng(torch_only=True)
    assert set(state) == {"torch"}
    first = torch.rand(3)
    np_before = np.random.rand()  # numpy moves on and must not be rewound
    checkpoint.restore_rng(state)
    assert torch.equal(torch.rand(3), first)
    assert np.random.rand() != np_before


def test_corrupt_checkpoint_is_skipped_and_previous_used(model_dir, tmp_path, capsys):
    write_model_def(model_dir, config=CONFIG)
    train(model_dir, tmp_path)
    with open(tmp_path / "checkpoints" / "6" / "model.pt", "r+b") as f:
        f.truncate(100)
    set_length(model_dir, 8)
    capsys.readouterr()
    train(model_dir, tmp_path)
    out, err = capsys.readouterr()
    assert (
        f"checkpoint {tmp_path}/checkpoints/6 is corrupt: model.pt does not match its checksum; skipping it"
        in err
    )
    assert f"resuming from {tmp_path}/checkpoints/4 at batch 4" in out
    entries = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    batches = [(e["type"], e["batches"]) for e in entries]
    assert len(batches) == len(set(batches)), "no report twice after the resume"
    assert batches[-1] == ("validation", 8)


def test_missing_manifest_is_skipped(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    (root / "9").mkdir(parents=True)
    assert checkpoint.load_newest_valid(str(root)) is None
    assert "checkpoints/9 is corrupt: no readable manifest" in capsys.readouterr().err


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_checkpoint_is_loaded_as_data_never_code(model_dir, tmp_path, monkeypatch, capsys):
    write_model_def(model_dir, config=CONFIG)
    train(model_dir, tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    newest = tmp_path / "checkpoints" / "6"
    torch.save({"w": Evil()}, newest / "model.pt")
    manifest = json.load(open(newest / "manifest.json"))
    manifest["files"]["model.pt"] = checkpoint.sha256_file(str(newest / "model.pt"))  # a well-formed manifest
    json.dump(manifest, open(newest / "manifest.json", "w"))
    ckpt = checkpoint.load_newest_valid(str(tmp_path / "checkpoints"))
    assert ckpt is not None and ckpt.path.endswith("/4")
    assert "checkpoints/6 is corrupt: cannot be loaded" in capsys.readouterr().err
    assert not marker.exists()


def test_retention_keeps_newest_and_best(tmp_path):
    root = str(tmp_path)
    for b, acc in [(2, 0.9), (4, 0.5), (6, 0.6), (8, 0.7)]:
        state = {"validation_metrics": {"accuracy": acc}, "progress": {}}
        checkpoint.save(root, b, state, {}, {}, {})
    checkpoint.apply_retention(root, keep_latest=2, keep_best=1, metric="accuracy", smaller_is_better=False)
    assert checkpoint.checkpoint_dirs(root) == [8, 6, 2]
    checkpoint.apply_retention(root, keep_latest=1, keep_best=1, metric="accuracy", smaller_is_better=True)
    assert checkpoint.checkpoint_dirs(root) == [8, 6]


def test_fresh_moves_the_earlier_run_aside(model_dir, tmp_path, capsys):
    write_model_def(model_dir, config=CONFIG)
    train(model_dir, tmp_path)
    capsys.readouterr()
    train(model_dir, tmp_path, fresh=True)
    out = capsys.readouterr().out
    assert "--fresh: moved the earlier run in" in out and "resuming" not in out
    previous = [d for d in os.listdir(tmp_path) if d.startswith("previous-")]
    assert len(previous) == 1 and os.path.exists(tmp_path / previous[0] / "metrics.jsonl")
    assert os.path.exists(tmp_path / previous[0] / "config.yaml")  # the earlier run's own config


def test_fresh_run_failing_in_set_up_leaves_the_earlier_run_in_place(model_dir, tmp_path, capsys):
    write_model_def(model_dir, config=CONFIG)
    train(model_dir, tmp_path)
    write_model_def(model_dir, config=CONFIG.replace("batch: 20", "batchsize: 20"))
    with pytest.raises(HarnessError, match="batch"):  # batch_size() reads hyperparameter 'batch'
        train(model_dir, tmp_path, fresh=True)
    assert not [d for d in os.listdir(tmp_path) if d.startswith("previous-")]
    assert checkpoint.checkpoint_dirs(str(tmp_path / "checkpoints")) == [6, 4, 2]


def test_finished_run_is_not_trained_again(model_dir, tmp_path, capsys):
    write_model_def(model_dir, config=CONFIG)
    train(model_dir, tmp_path)
    capsys.readouterr()
    train(model_dir, tmp_path)
    assert "already trained 6 of 6 batches" in capsys.readouterr().out


def test_resume_from_named_checkpoint_that_is_bad(model_dir, tmp_path):
    write_model_def(model_dir, config=CONFIG)
    with pytest.raises(HarnessError, match="--resume .*nowhere: no such checkpoint folder"):
        train(model_dir, tmp_path, resume_from=str(tmp_path / "nowhere"))


def test_tensorboard_plot_and_summary(model_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = GOOD_MODEL_DEF
    model = model.replace(
        'return {"loss": losses, "accuracy": (predictions.argmax(1) == labels).float().mean()}',
        'return {"loss": losses, "accuracy": (predictions.argmax(1) == labels).float().mean(),'
        ' "per_class": torch.bincount(labels, minlength=10).float() / len(labels)}',
    )
    write_model_def(model_dir, model_def=model, config=CONFIG)
    train(model_dir, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"training/loss", "validation/accuracy", "validation/loss", "validation/per_class/9"} <= set(tags)
    assert [e.step for e in events.Scalars("validation/accuracy")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("training/loss")] == [3, 6]
    per_class = sum(events.Scalars(f"validation/per_class/{i}")[-1].value for i in range(10))
    assert per_class == pytest.approx(1.0, abs=1e-5)

    assert tools.main(["plot", str(tmp_path)]) == 0
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05, "the picture is not blank"

    capsys.readouterr()
    assert tools.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy *" in out and "batch       6" in out and "checkpoints:" in out


def test_plot_of_a_folder_without_metrics(tmp_path):
    with pytest.raises(HarnessError, match="no metrics.jsonl"):
        tools.main(["plot", str(tmp_path)])


def test_summary_calls_only_the_searcher_metric_best(tmp_path, capsys):
    # mse falls then rises: it must not be called "best" at its last value, nor guessed from its name.
    entries = [
        {"type": "validation", "batches": b, "epoch": b / 10, "records": b * 20, "time": 0.0,
         "metrics": {"mse": mse, "accuracy": acc}}
        for b, mse, acc in [(10, 0.66, 0.5), (20, 0.54, 0.7), (30, 0.6, 0.65)]
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (tmp_path / "config.yaml").write_text("searcher: {metric: accuracy, smaller_is_better: false}\n")
    assert tools.main(["summary", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("metric")))
    assert lines[header].split() == ["metric", "last", "at", "batch", "best", "at", "batch", "min", "max"]
    assert lines[header + 1].split() == ["accuracy", "*", "0.65", "30", "0.7", "20", "0.5", "0.7"]
    assert lines[header + 2].split() == ["mse", "0.6", "30", "0.54", "0.66"]  # no "best" column


@pytest.mark.integration  # starts the harness (or a script) as its own process
def test_summary_into_a_closed_pipe_is_quiet(tmp_path):
    import sys

    import runner

    entry = {"type": "validation", "batches": 1, "epoch": 0.1, "records": 1, "time": 0.0, "metrics": {}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(entry) + "\n")
    for b in range(3000):  # a long checkpoint list, so that the reader's end is hit while writing
        (tmp_path / "checkpoints" / str(b)).mkdir(parents=True)
    cmd = f"{sys.executable} -m harness summary {tmp_path} | head -n 1"
    proc = runner.run(["bash", "-c", cmd], timeout=60)
    assert proc.stdout.startswith("run: ") and proc.stderr == "", proc.stderr
