"""Determined's trial API under real launchers: the sample at np=2 under Gloo and MPI, the same numbers at
np=1 and np=2, SIGKILL and exact resume with two models, two optimizers, schedulers and a callback with state,
and InvalidHP in a search."""

import os
import re

import pytest
import runner
from conftest import SAMPLES, write_model_def
from determined_defs import CONTEXT_DEF, GAN_DEF
from test_launchers import LAUNCHERS, assert_no_rank_traceback, assert_ok, launch, reports
from test_long_runs import RESUME_CONFIG, kill_and_resume_matches_straight

SAMPLE = os.path.join(SAMPLES, "determined_digits")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_determined_sample_trains_at_np2(launcher, tmp_path):
    proc, _ = launch(launcher, 2, SAMPLE, tmp_path / "out", timeout=180)
    assert_ok(proc)
    assert "trial API context (Determined)" in proc.stdout
    last = reports(tmp_path / "out", "validation")[-1]["metrics"]
    assert last["accuracy"] > 0.8 and 0 <= last["min_class_recall"] <= 1
    # StepLR(gamma=0.8) stepped after each of the 4 epochs; the report shows the rate the last epoch used
    training = reports(tmp_path / "out", "training")
    assert training[-1]["metrics"]["lr"] == pytest.approx(0.05 * 0.8**3)
    assert "records_per_epoch" in proc.stderr  # named in the one warning about cluster keys


# The other Determined-layout samples: (folder, trial API, what the last validation must show)
SAMPLES_012_GAN = [
    ("determined_012", "context with build_model (Determined 0.12)", lambda m: m["accuracy"] > 0.8),
    ("determined_gan", "context (Determined)", lambda m: 0 < m["real_loss"] < 1.5 and "real_accuracy" in m),
]


@pytest.mark.parametrize("sample, api, good", SAMPLES_012_GAN, ids=[s[0] for s in SAMPLES_012_GAN])
@pytest.mark.parametrize("launcher, np", [("local", 1), ("gloo", 2), ("mpi", 2)])
def test_determined_samples_under_each_launcher(sample, api, good, launcher, np, tmp_path):
    proc, _ = launch(launcher, np, os.path.join(SAMPLES, sample), tmp_path / "out", timeout=180)
    assert_ok(proc)
    assert f"trial API {api}" in proc.stdout
    assert good(reports(tmp_path / "out", "validation")[-1]["metrics"])
    assert "harness: warning:" not in proc.stderr


def test_determined_adaptive_search_of_a_sample(tmp_path):
    sample = os.path.join(SAMPLES, "determined_012")
    search = runner.harness("search", sample, "--config", os.path.join(sample, "adaptive.yaml"),
                            "--output", tmp_path / "search")  # fmt: skip
    proc = runner.run(search, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "adaptive_asha searcher, 4 trials" in proc.stdout and "2 at a time" in proc.stdout
    ended = re.findall(r"trial (\d+): (?:completed: best validation_loss|stopped early)", proc.stdout)
    assert sorted(map(int, ended)) == [0, 1, 2, 3], proc.stdout[-3000:]


def test_context_api_same_numbers_at_np1_and_np2(tmp_path):
    config = RESUME_CONFIG.replace("batch: 20", "global_batch_size: 20")
    model_dir = write_model_def(tmp_path / "model", model_def=CONTEXT_DEF, data=None, config=config)
    runs = {}
    for launcher, np in [("local", 1), ("gloo", 2), ("mpi", 2)]:
        out = tmp_path / f"out-{launcher}{np}"
        proc, _ = launch(launcher, np, model_dir, out, timeout=180)
        assert_ok(proc)
        runs[launcher] = reports(out)
    for launcher in ("gloo", "mpi"):
        assert [(e["type"], e["batches"]) for e in runs[launcher]] == [
            (e["type"], e["batches"]) for e in runs["local"]
        ]
        for mine, theirs in zip(runs[launcher], runs["local"]):
            for metric, value in theirs["metrics"].items():
                assert mine["metrics"][metric] == pytest.approx(value, rel=1e-5), (launcher, mine, metric)


def test_sigkill_and_resume_with_two_models_optimizers_schedulers_and_a_callback(tmp_path):
    config = RESUME_CONFIG.replace("batch: 20", "global_batch_size: 20")
    model_dir = write_model_def(tmp_path / "model", model_def=GAN_DEF, data=None, config=config)
    (straight, resumed), _, _ = kill_and_resume_matches_straight(model_dir, tmp_path)
    assert {"loss_a", "loss_b", "lr"} <= set(straight[0]["metrics"])


INVALID_SEARCH = """
hyperparameters:
  global_batch_size: 20
  lr:
    type: categorical
    vals: [0.1, 5.0]
searcher:
  name: grid
  metric: accuracy
  smaller_is_better: false
  max_length: {batches: 6}
scheduling_unit: 3
reproducibility:
  experiment_seed: 3
"""


def test_invalid_hp_in_a_search_is_recorded_and_the_search_goes_on(tmp_path):
    model = CONTEXT_DEF.replace(
        "        self.context = context\n",
        "        self.context = context\n"
        "        import determined\n"
        "        if context.get_hparam('lr') > 1:\n"
        "            raise determined.InvalidHP('lr above 1')\n",
        1,
    )
    model_dir = write_model_def(tmp_path / "model", model_def=model, data=None, config=INVALID_SEARCH)
    search = runner.harness("search", model_dir, "--config", tmp_path / "model" / "experiment.yaml",
                            "--output", tmp_path / "search", "--parallel", "1")  # fmt: skip
    proc = runner.run(search, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "invalid hyperparameters:" in proc.stdout and "raised InvalidHP: lr above 1" in proc.stdout
    assert proc.stdout.count("completed: best accuracy") == 1


# ----------------------------------------------------------------------------------------------------------
# Trainer scripts (0.21+): `python train.py`, alone and under the launchers

TRAINER_SAMPLE = os.path.join(SAMPLES, "determined_trainer")


def trainer_script(tmp_path, old="", new=""):
    """The sample's train.py and const.yaml in a folder of their own, with a fixed experiment seed."""
    folder = tmp_path / "script"
    folder.mkdir(exist_ok=True)
    with open(os.path.join(TRAINER_SAMPLE, "train.py")) as f:
        text = f.read().replace(
            "pytorch.init()", 'pytorch.init(exp_conf={"reproducibility": {"experiment_seed": 3}})'
        )
    assert old in text
    (folder / "train.py").write_text(text.replace(old, new))
    with open(os.path.join(TRAINER_SAMPLE, "const.yaml")) as f:
        (folder / "const.yaml").write_text(f.read())
    return folder / "train.py"


def run_script(launcher, np, script, output, timeout=180):
    argv = runner.under(
        launcher, np, [os.path.join(runner.BIN, "python"), str(script)], forward=("HARNESS_OUTPUT_DIR",)
    )
    return runner.run(argv, timeout=timeout, env={"HARNESS_OUTPUT_DIR": str(output)}, cwd=str(script.parent))


def test_trainer_script_runs_unchanged_and_the_same_at_np1_and_np2(tmp_path):
    script = trainer_script(tmp_path)
    runs = {}
    for launcher, np in [("local", 1), ("gloo", 2), ("mpirun", 2)]:
        out = tmp_path / f"out-{launcher}"
        proc = run_script(launcher, np, script, out)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "trial API context (Determined)" in proc.stdout
        runs[launcher] = reports(out)
    local = runs["local"]
    assert [e["batches"] for e in local if e["type"] == "validation"] == [45, 90, 135]  # validation_period
    assert [e["batches"] for e in local if e["type"] == "training"][:3] == [15, 30, 45]  # reporting_period
    assert local[-1]["metrics"]["accuracy"] > 0.85
    for launcher in ("gloo", "mpirun"):
        for mine, theirs in zip(runs[launcher], local):
            for metric, value in theirs["metrics"].items():
                assert mine["metrics"][metric] == pytest.approx(value, rel=1e-5), (launcher, mine, metric)
    # The same command again resumes from the newest checkpoint there (at another world size, too).
    proc = run_script("local", 1, script, tmp_path / "out-gloo")
    assert proc.returncode == 0 and "already trained 135 of 135 batches" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("max_length = pytorch.Epoch(3)", "max_length = None", "Trainer.fit() needs max_length here"),
        ("max_length = pytorch.Epoch(3)", "max_length = 3", "Trainer.fit(max_length=...) got 3; expected"),
        (
            "trainer = pytorch.Trainer(trial, train_context)",
            "trainer = pytorch.Trainer(trial, None)",
            "pytorch.Trainer(trial, context) got a NoneType as the context",
        ),
        (
            "from determined import pytorch",
            "from determined import pytorch\nfrom determined import core",
            "imports determined.core, which is not provided by this harness's determined package",
        ),
    ],
)
def test_trainer_script_errors_are_one_line(tmp_path, old, new, expected):
    script = trainer_script(tmp_path, old, new)
    proc = run_script("gloo", 2, script, tmp_path / "out", timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors and expected in errors[0], proc.stderr[-3000:]
    assert_no_rank_traceback(proc.stderr)


def test_trainer_script_under_harness_launch_restarts_and_resumes(tmp_path):
    kill = (
        "        data, labels = batch\n"
        "        import os, signal\n"
        "        marker = os.environ['MARKER']\n"
        "        rank = self.context.distributed.get_rank()\n"
        "        if batch_idx == 50 and rank == 1 and not os.path.exists(marker):\n"
        "            open(marker, 'w').close()\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    script = trainer_script(tmp_path, "        data, labels = batch\n", kill)
    script.write_text(
        script.read_text().replace(
            "            reporting_period=",
            "            checkpoint_period=pytorch.Batch(45),\n            reporting_period=",
            1,
        )
    )
    out = tmp_path / "out"
    argv = runner.harness(
        "launch",
        "-np",
        "2",
        "--launcher",
        "gloo",
        "--output",
        out,
        "--",
        os.path.join(runner.BIN, "python"),
        script,
    )
    proc = runner.run(argv, timeout=300, env={"MARKER": str(tmp_path / "killed")}, cwd=str(script.parent))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.exists(tmp_path / "killed") and "harness launch: restart 1 of 5" in proc.stdout
    assert f"resuming from {out}/checkpoints/45 at batch 45" in proc.stdout
    assert reports(out, "validation")[-1]["batches"] == 135
    # Bad input is not retried.
    bad = trainer_script(tmp_path, "max_length = pytorch.Epoch(3)", "max_length = None")
    argv = runner.harness(
        "launch", "-np", "2", "--output", tmp_path / "bad", "--", os.path.join(runner.BIN, "python"), bad
    )
    proc = runner.run(argv, timeout=120, cwd=str(bad.parent))
    assert proc.returncode == 2 and "not restarting: Trainer.fit() needs max_length" in proc.stdout, (
        proc.stdout[-2000:]
    )
