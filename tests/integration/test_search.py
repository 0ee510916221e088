"""`harness search`: real trials (each a `harness launch` job), a real Optuna study in SQLite.

The PostgreSQL case (two workers, one study) is in test_search_postgres.py.
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import runner
import yaml
from conftest import GOOD_DATA, write_model_def

BIN = os.path.dirname(sys.executable)

SEARCH_MODEL = """
import time
import torch
from torch import nn
import harness


class Trial(harness.PyTorchTrial):
    def build_model(self, hparams):
        if hparams["width"] == 13:
            raise ValueError("width 13 is unlucky")
        width = hparams["width"]
        return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=harness.get_hyperparameter("lr"))

    def batch_size(self):
        return 20

    def losses(self, predictions, labels):
        time.sleep(harness.get_hyperparameter("pause"))
        return nn.functional.cross_entropy(predictions, labels)

    def validation_metrics(self, predictions, labels, losses):
        return {"loss": losses, "accuracy": (predictions.argmax(1) == labels).float().mean()}
"""

GRID = """
name: grid-test
hyperparameters:
  pause: 0
  lr: {type: categorical, vals: [0.1, 0.3]}
  width: {type: int, minval: 16, maxval: 32, count: 2}
searcher:
  name: grid
  metric: accuracy
  smaller_is_better: false
  max_length: {batches: 6}
min_validation_period: {batches: 3}
scheduling_unit: 3
reproducibility: {experiment_seed: 5}
"""

RANDOM = """
hyperparameters:
  pause: PAUSE
  lr: {type: log, base: 10, minval: -2, maxval: -0.5}
  width: {type: categorical, vals: [16, 24, 32]}
searcher:
  name: random
  metric: accuracy
  smaller_is_better: false
  max_trials: TRIALS
  max_length: {batches: LENGTH}
min_validation_period: {batches: 3}
min_checkpoint_period: {batches: 3}
scheduling_unit: 3
reproducibility: {experiment_seed: SEED}
"""


def random_config(trials=3, seed=7, pause=0, length=6):
    text = RANDOM.replace("PAUSE", str(pause)).replace("TRIALS", str(trials)).replace("SEED", str(seed))
    return text.replace("LENGTH", str(length))


def search(model_dir, out, *extra, timeout=300, config=None):
    config_args = ["--config", config] if config else []
    return runner.run(runner.harness("search", model_dir, "--output", out, *extra, *config_args), timeout)


def start_search(model_dir, out, *extra):
    command = runner.harness("search", model_dir, "--output", out, *extra)
    return runner.start(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"


def study_trials(out):
    with open(os.path.join(out, "search.json")) as f:
        info = json.load(f)
    storage = optuna.storages.RDBStorage(info["storage"])
    return optuna.load_study(study_name=info["study"], storage=storage).get_trials(deepcopy=False)


def trial_hparams(out, number):
    with open(os.path.join(out, "trials", str(number), "trial-config.yaml")) as f:
        return yaml.safe_load(f)["hyperparameters"]


def test_grid_runs_every_combination_once_and_summary_and_plot_show_them(model_dir, tmp_path):
    write_model_def(model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=GRID)
    out = tmp_path / "out"
    proc = search(model_dir, out, "--parallel", "2")
    assert_ok(proc)
    trials = study_trials(out)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    seen = sorted((h["lr"], h["width"]) for h in (trial_hparams(out, t.number) for t in trials))
    assert seen == sorted(itertools.product([0.1, 0.3], [16, 32]))
    for t in trials:  # each trial's own folder: its metrics and checkpoints
        folder = out / "trials" / str(t.number)
        assert (folder / "metrics.jsonl").is_file() and (folder / "checkpoints").is_dir()
        assert trial_hparams(out, t.number)["pause"] == 0
    assert "grid searcher, 4 trials" in proc.stdout
    summary = runner.run(runner.harness("summary", out), timeout=60)
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trial"))
    rows = lines[header + 1 : header + 5]
    values = [float(r.split()[4]) for r in rows]
    assert values == sorted(values, reverse=True)  # best (largest accuracy) first
    best = next(line for line in lines if line.startswith("best trial: "))
    assert best.startswith(f"best trial: {rows[0].split()[0]} (accuracy ")
    checkpoint = best.split("its best checkpoint: ")[1]
    assert (
        os.path.isfile(os.path.join(checkpoint, "model.pt"))
        and f"/trials/{rows[0].split()[0]}/" in checkpoint
    )
    plot = runner.run(runner.harness("plot", out), timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert os.path.getsize(out / "search.png") > 10_000


def test_random_with_a_seed_samples_the_same_values_in_any_order(model_dir, tmp_path):
    write_model_def(model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=random_config())
    runs = {}
    for name, parallel in (("one", "1"), ("two", "2")):
        proc = search(model_dir, tmp_path / name, "--parallel", parallel)
        assert_ok(proc)
        runs[name] = {
            t.number: trial_hparams(tmp_path / name, t.number) for t in study_trials(tmp_path / name)
        }
    assert len(runs["one"]) == 3 and runs["one"] == runs["two"]
    assert len({h["lr"] for h in runs["one"].values()}) == 3  # sampled, not one value
    other = tmp_path / "seed8.yaml"
    other.write_text(random_config(seed=8))
    assert_ok(search(model_dir, tmp_path / "three", "--config", other))
    assert {
        t.number: trial_hparams(tmp_path / "three", t.number)["lr"] for t in study_trials(tmp_path / "three")
    } != {n: h["lr"] for n, h in runs["one"].items()}
    # The finished search "one" is not continued with another config: one line, exit 2.
    again = search(model_dir, tmp_path / "one", "--config", other)
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1, again.stderr
    assert "is a search with another config; to continue it, pass the same config" in again.stderr
    assert_ok(search(model_dir, tmp_path / "one"))  # the same config: nothing left to do, the table again


ASHA = """
hyperparameters:
  pause: 0
  width: 32
  lr: {type: categorical, vals: [0.5, 0.00001, 0.00002, 0.00003]}
searcher:
  name: adaptive_asha
  metric: accuracy
  smaller_is_better: false
  max_trials: 6
  max_length: {batches: 48}
  divisor: 4
  max_rungs: 2
  mode: aggressive
scheduling_unit: 12
reproducibility: {experiment_seed: 3}
"""


def test_asha_stops_bad_settings_at_the_first_rung_and_trains_the_best_to_the_end(model_dir, tmp_path):
    """Trials of two ranks (horovodrun --gloo): rank 0 asks the study, every rank stops at the same batch."""
    write_model_def(model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=ASHA)
    out = tmp_path / "out"
    proc = search(model_dir, out, "-np", "2", "--launcher", "gloo")
    assert_ok(proc)
    trials = sorted(study_trials(out), key=lambda t: t.number)
    assert len(trials) == 6
    batches = {}
    for t in trials:
        entries = [json.loads(line) for line in open(out / "trials" / str(t.number) / "metrics.jsonl")]
        batches[t.number] = max(e["batches"] for e in entries)
    lr = {t.number: trial_hparams(out, t.number)["lr"] for t in trials}
    bad = [n for n in lr if lr[n] < 0.001]
    assert len(bad) >= 2, lr  # the seed samples several bad settings
    # The first trial to reach the rung has no rival and goes on; every later bad one stops at the rung.
    for n in bad[1:] if bad[0] == 0 else bad:
        state = trials[n].state.name
        assert state == "PRUNED" and batches[n] == 12, (n, state, batches[n], lr)
        assert f"trial {n}: stopped early at batch 12" in proc.stdout
        checkpoints = os.listdir(out / "trials" / str(n) / "checkpoints")
        assert "12" in checkpoints  # stopped with a checkpoint
        with open(out / "trials" / str(n) / "checkpoints" / "12" / "state.json") as f:
            assert json.load(f)["ranks"] == 2
    best = max((t for t in trials if t.value is not None), key=lambda t: t.value)
    assert lr[best.number] == 0.5 and best.state.name == "COMPLETE" and batches[best.number] == 48


def test_a_failing_trial_is_recorded_and_the_search_goes_on(model_dir, tmp_path):
    config = GRID.replace(
        "{type: int, minval: 16, maxval: 32, count: 2}", "{type: categorical, vals: [13, 16]}"
    )
    write_model_def(
        model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=config.replace("[0.1, 0.3]", "[0.1]")
    )
    out = tmp_path / "out"
    proc = search(model_dir, out)
    assert_ok(proc)
    states = {trial_hparams(out, t.number)["width"]: t.state.name for t in study_trials(out)}
    assert states == {13: "FAIL", 16: "COMPLETE"}
    failed = [line for line in proc.stdout.splitlines() if "failed:" in line]
    assert len(failed) == 2  # the trial's event, and the summary's line
    assert all("ValueError: width 13 is unlucky (at " in line and "model_def.py:" in line for line in failed)


def test_bad_input_stops_the_search_with_one_line(model_dir, tmp_path):
    write_model_def(model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=GRID)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GRID.replace("count: 2}", "}"))
    proc = search(model_dir, tmp_path / "out", config=bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"harness: error: {bad}: config key 'hyperparameters.width': "
        "the grid searcher needs 'count' for type 'int'"
    ]
    (model_dir / "model_def.py").write_text(SEARCH_MODEL + "\n    def broken(:\n")
    proc = search(model_dir, tmp_path / "out2")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "syntax error in " in proc.stderr and "model_def.py:28" in proc.stderr
    assert not (tmp_path / "out2" / "trials").exists()
    # Bad input that only training finds (the training set is smaller than the batch): the first three trials
    # fail the same way, and the search stops there.
    write_model_def(
        model_dir, model_def=SEARCH_MODEL.replace("return 20", "return 1000"), data=GOOD_DATA, config=GRID
    )
    proc = search(model_dir, tmp_path / "out3")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert proc.stderr.startswith("harness search: error: the first 3 trials failed the same way: ")
    assert len(proc.stderr.splitlines()) == 1 and "global batch" in proc.stderr
    assert len(study_trials(tmp_path / "out3")) == 3


def test_training_with_a_search_config_says_to_use_harness_search(model_dir, tmp_path):
    write_model_def(model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=GRID)
    proc = runner.run(runner.harness(model_dir, "--output", tmp_path / "o"), timeout=120)
    assert proc.returncode == 2
    assert "run it with `harness search MODEL_DIR --config FILE --output OUT`" in proc.stderr


def _wait_for_checkpoint(out, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(out.glob("trials/*/checkpoints/*/state.json")):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("no trial checkpointed in time")


def test_killed_search_resumes_its_trials_and_ends_with_exactly_max_trials(model_dir, tmp_path):
    write_model_def(
        model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=random_config(4, pause=0.25, length=12)
    )
    out = tmp_path / "out"
    proc = start_search(model_dir, out, "--parallel", "2")
    _wait_for_checkpoint(out, proc)
    subprocess.run(["pkill", "-KILL", "-f", str(out)])  # the search, its trials' launchers and ranks
    proc.wait(timeout=30)
    running = {t.number: trial_hparams(out, t.number) for t in study_trials(out) if t.state.name == "RUNNING"}
    assert running, [t.state for t in study_trials(out)]
    rerun = search(model_dir, out, "--parallel", "2")
    assert_ok(rerun)
    trials = study_trials(out)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    for number, hparams in running.items():
        assert trial_hparams(out, number) == hparams  # the same values after the crash
        assert f"trial {number}: resumed" in rerun.stdout
    resumed_from_checkpoint = [
        n for n in running if "resuming from" in (out / "trials" / str(n) / "console.log").read_text()
    ]
    assert resumed_from_checkpoint, rerun.stdout


def test_sigterm_checkpoints_the_running_trials_and_the_same_command_continues(model_dir, tmp_path):
    write_model_def(
        model_dir, model_def=SEARCH_MODEL, data=GOOD_DATA, config=random_config(2, pause=0.25, length=12)
    )
    out = tmp_path / "out"
    proc = start_search(model_dir, out)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, stdout
    assert "harness search: stopped by SIGTERM; run the same command to continue" in stdout
    assert "trial 0: stopped with the search" in stdout
    assert [t.state.name for t in study_trials(out)] == ["RUNNING"]
    console = (out / "trials" / "0" / "console.log").read_text()
    assert "stopped by SIGTERM at batch" in console
    rerun = search(model_dir, out)
    assert_ok(rerun)
    assert [t.state.name for t in study_trials(out)] == ["COMPLETE", "COMPLETE"]
    after_stop = (out / "trials" / "0" / "console.log").read_text().rsplit("stopped by SIGTERM", 1)[1]
    assert "resuming from" in after_stop
