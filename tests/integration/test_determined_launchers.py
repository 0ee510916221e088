"""Determined's trial API under real launchers: the sample at np=2 under Gloo and MPI, the same numbers at
np=1 and np=2, SIGKILL and exact resume with two models, two optimizers, schedulers and a callback with state,
and InvalidHP in a search."""

import os

import pytest
import runner
from conftest import SAMPLES, write_model_def
from determined_defs import CONTEXT_DEF, GAN_DEF
from test_launchers import LAUNCHERS, assert_ok, launch, reports
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
