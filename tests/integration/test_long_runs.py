"""Long runs under real launchers: exact resume after SIGKILL, rank death, SIGTERM, restarts."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import runner
import torch
from conftest import GOOD_MODEL_DEF, write_model_def
from test_launchers import assert_ok, command, launch, reports

# A model with dropout and momentum, shuffled data: exact resume must restore RNGs and optimizer state.
# KILL_AT (env) makes rank 1 die with SIGKILL in that global batch, once (a marker file records it).
RESUME_MODEL = (
    GOOD_MODEL_DEF.replace(
        "nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)",
        "nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 10)",
    )
    .replace("lr=0.1)", "lr=0.05, momentum=0.9)")
    .replace(
        "    def losses(self, predictions, labels):\n",
        """    calls = 0

    def losses(self, predictions, labels):
        import os, signal, time
        env = os.environ  # this rank under horovodrun, mpirun or torchrun
        rank = env.get("HOROVOD_RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("RANK", "0")))
        marker = os.environ.get("MARKER", "")
        self.calls += predictions.requires_grad  # training batches of this process
        if predictions.requires_grad and rank == os.environ.get("FAIL_RANK", "1"):
            done = os.path.exists(marker)
            if self.calls == int(os.environ.get("KILL_AT", "0")) and not done:
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            if self.calls == int(os.environ.get("CRASH_AT", "0")) and (not done or os.environ.get("ALWAYS")):
                open(marker, "w").close()
                raise RuntimeError("injected crash")
        time.sleep(float(os.environ.get("SLOW", "0")))
""",
    )
)

RESUME_CONFIG = """
hyperparameters:
  batch: 20
searcher:
  metric: accuracy
  smaller_is_better: false
  max_length: {batches: 30}
min_validation_period: {batches: 5}
min_checkpoint_period: {batches: 4}
checkpoint_policy: none
checkpoint_storage: {save_trial_latest: 2, save_trial_best: 1}
scheduling_unit: 3
reproducibility:
  experiment_seed: 5
"""


def run_with_env(cmd, env_extra, timeout=120):
    return runner.timed(cmd, timeout, env_extra)


def horovodrun(launcher, model_dir, output, *extra):
    forward = ("KILL_AT", "MARKER", "CRASH_AT", "SLOW")  # what the test models read
    return runner.training(launcher, 2, model_dir, output, *extra, forward=forward)


def final_weights(output):
    root = os.path.join(output, "checkpoints")
    latest = open(os.path.join(root, "latest")).read().strip()
    return latest, torch.load(os.path.join(root, latest, "model.pt"), weights_only=True)


def kill_and_resume_matches_straight(model_dir, tmp_path):
    """Run the job straight; then with rank 1 SIGKILLed at a random batch, and the same command again.
    Checks the resume point, the final weights (<= 1e-6) and every report; returns (reports of both runs,
    the resumed output, the kill batch)."""
    proc, _ = run_with_env(horovodrun("gloo", model_dir, tmp_path / "straight"), {})
    assert_ok(proc)

    kill_at = random.Random().randint(6, 27)  # a random batch, mid-epoch or not (15 batches per epoch)
    env = {"KILL_AT": str(kill_at), "MARKER": str(tmp_path / "killed")}
    killed = tmp_path / "killed-run"
    proc, _ = run_with_env(horovodrun("gloo", model_dir, killed), env)
    assert proc.returncode != 0 and os.path.exists(tmp_path / "killed"), (
        f"kill at {kill_at}: {proc.stderr[-2000:]}"
    )
    proc, _ = run_with_env(horovodrun("gloo", model_dir, killed), env)  # the same command again
    assert_ok(proc)
    resumed_at = (kill_at - 1) // 4 * 4
    assert f"resuming from {killed}/checkpoints/{resumed_at} at batch {resumed_at}" in proc.stdout, kill_at

    batch_a, straight = final_weights(tmp_path / "straight")
    batch_b, resumed = final_weights(killed)
    assert batch_a == batch_b == "30"
    for name, tensor in straight.items():
        assert (tensor - resumed[name]).abs().max().item() <= 1e-6, (name, kill_at)
    a, b = reports(tmp_path / "straight"), reports(killed)
    assert [(e["type"], e["batches"]) for e in a] == [(e["type"], e["batches"]) for e in b], kill_at
    for x, y in zip(a, b):
        assert set(x["metrics"]) == set(y["metrics"]), (x, y)
        for k, v in x["metrics"].items():
            assert y["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (
                x["type"],
                x["batches"],
                k,
                kill_at,
            )
    return (a, b), killed, kill_at


def test_resume_after_sigkill_is_exact(model_dir, tmp_path):
    write_model_def(model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG)
    _, killed, _ = kill_and_resume_matches_straight(model_dir, tmp_path)
    # Retention: the newest 2 and the best 1 by accuracy.
    kept = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
    assert 30 in kept and 28 in kept and len(kept) <= 3


def test_resume_with_a_different_number_of_ranks(model_dir, tmp_path):
    write_model_def(
        model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG.replace("{batches: 30}", "{batches: 12}")
    )
    proc, _ = launch("gloo", 2, model_dir, tmp_path / "out")
    assert_ok(proc)
    write_model_def(
        model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG.replace("{batches: 30}", "{batches: 20}")
    )
    proc, _ = launch("local", 1, model_dir, tmp_path / "out")
    assert_ok(proc)
    assert "resuming from" in proc.stdout and "at batch 12" in proc.stdout
    assert [e["batches"] for e in reports(tmp_path / "out", "validation")] == [5, 10, 12, 15, 20]


@pytest.mark.parametrize("launcher", ["gloo", "mpi", "mpirun"])
def test_rank_killed_ends_job_within_30s(launcher, model_dir, tmp_path):
    write_model_def(model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG)
    env = {"KILL_AT": "3", "MARKER": str(tmp_path / "marker")}
    proc, seconds = run_with_env(horovodrun(launcher, model_dir, tmp_path / "out"), env, timeout=90)
    assert proc.returncode != 0
    assert seconds < 30, seconds


def start_and_wait_for_training(cmd, env_extra, output):
    proc = runner.start(cmd, env_extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(output / "metrics.jsonl") and reports(output, "training"):
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training did not start: " + proc.communicate()[1][-2000:])


def sigterm_when_marked(cmd, marker, output, what):
    """Start the job, wait (up to 60 s) until its code writes `marker`, then SIGTERM it; returns
    (the process, stdout, stderr, seconds from the signal to the job's end)."""
    proc = start_and_wait_for_training(cmd, {"MARKER": str(marker)}, output)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), f"{what} did not start"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    return proc, stdout, stderr, time.monotonic() - start


@pytest.mark.parametrize("how", ["launch-gloo", "launch-mpi", "horovodrun-gloo"])
def test_sigterm_checkpoints_and_exits_zero(how, model_dir, tmp_path):
    write_model_def(
        model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG.replace("{batches: 30}", "{batches: 3000}")
    )
    output = tmp_path / "out"
    if how.startswith("launch"):
        cmd = command(how, 2, model_dir, output)
    else:
        cmd = horovodrun("gloo", model_dir, output)
    proc = start_and_wait_for_training(cmd, {"SLOW": "0.02"}, output)
    start = time.monotonic()
    if how.startswith("launch"):
        proc.send_signal(signal.SIGTERM)
    else:
        # To the ranks, as a scheduler that signals the whole job does. (SIGTERM to horovodrun --gloo
        # itself makes horovodrun SIGTERM each rank's `sh -c` wrapper right after the rank exits, so its
        # exit status is 143 or 0 by a race inside horovodrun: README "Long runs".)
        pids = [json.load(open(p))["pid"] for p in glob.glob(str(output / ".harness" / "pids" / "rank*"))]
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    lines = [line for line in stdout.splitlines() if "stopped by SIGTERM at batch" in line]
    assert lines, stdout[-2000:]
    path = lines[0].split("checkpoint: ")[1].strip()
    from harness.output import checkpoint

    assert checkpoint.verify(path) is None
    assert json.load(open(os.path.join(path, "state.json")))["progress"]["batches"] == int(
        os.path.basename(path)
    )


SLOW_VALIDATION = GOOD_MODEL_DEF.replace(
    "    def validation_metrics(self, predictions, labels, losses):\n",
    """    def validation_metrics(self, predictions, labels, losses):
        import os, time
        open(os.environ["MARKER"], "a").close()  # validation has started
        time.sleep(3)
""",
)


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_sigterm_during_validation_abandons_it(launcher, model_dir, tmp_path):
    """A validation of ~20 s is abandoned within seconds; the checkpoint is at the last training batch."""
    write_model_def(
        model_dir,
        model_def=SLOW_VALIDATION,
        config=RESUME_CONFIG.replace("{batches: 30}", "{batches: 300}").replace(
            "metric: accuracy", "metric: loss"
        ),
    )
    output, marker = tmp_path / "out", tmp_path / "validating"
    cmd = command(f"launch-{launcher}", 2, model_dir, output)
    proc, stdout, stderr, seconds = sigterm_when_marked(cmd, marker, output, "validation")
    assert seconds < 12, stdout[-2000:]
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert (
        "stopped by SIGTERM at batch 5;" in stdout
        or "stopped by a stop request on another rank at batch 5;" in stdout
    )
    assert [e for e in reports(output, "validation") if e["batches"] == 5] == []  # abandoned, not reported
    from harness.output import checkpoint

    assert checkpoint.checkpoint_dirs(str(output / "checkpoints"))[0] == 5


def test_launch_restarts_after_a_crash(model_dir, tmp_path):
    write_model_def(model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG)
    output = tmp_path / "out"
    cmd = command("launch-gloo", 2, model_dir, output)
    proc, _ = run_with_env(cmd, {"CRASH_AT": "10", "MARKER": str(tmp_path / "crashed")}, timeout=180)
    assert_ok(proc)
    assert (
        "harness launch: restart 1 of 5 after failure: [rank 1] RuntimeError: injected crash" in proc.stdout
        or ("harness launch: restart 1 of 5 after failure: RuntimeError: injected crash" in proc.stdout)
    ), proc.stdout[-2000:]
    assert "resuming from" in proc.stdout
    assert reports(output, "validation")[-1]["batches"] == 30


def test_launch_gives_up_after_max_restarts(model_dir, tmp_path):
    write_model_def(model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG + "max_restarts: 2\n")
    cmd = command("launch-gloo", 2, model_dir, tmp_path / "out")
    proc, _ = run_with_env(cmd, {"CRASH_AT": "2", "ALWAYS": "1", "MARKER": str(tmp_path / "m")}, timeout=240)
    assert proc.returncode != 0
    assert proc.stdout.count("harness launch: restart ") == 2
    assert "giving up after 2 restarts" in proc.stdout


def test_launch_names_a_killed_rank_as_the_cause(model_dir, tmp_path):
    """Rank 1 is SIGKILLed: the cause is that rank, not the broken collective rank 0 then saw."""
    write_model_def(model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG)
    cmd = command("launch-gloo", 2, model_dir, tmp_path / "out", "--max-restarts", "1")
    proc, _ = run_with_env(cmd, {"KILL_AT": "4", "MARKER": str(tmp_path / "killed")}, timeout=180)
    assert_ok(proc)
    line = next(x for x in proc.stdout.splitlines() if "harness launch: restart 1 of 1 after failure:" in x)
    assert "rank 1 (pid " in line and "was killed by SIGKILL, without an error of its own" in line, line
    assert "HorovodInternalError" not in line.split("; then:")[0]


def test_launch_does_not_retry_bad_input(model_dir, tmp_path):
    write_model_def(model_dir, config=RESUME_CONFIG.replace("batch: 20", "batch: 21"))
    cmd = command("launch-gloo", 2, model_dir, tmp_path / "out")
    proc, _ = run_with_env(cmd, {}, timeout=120)
    assert proc.returncode == 2
    assert "harness launch: restart" not in proc.stdout
    assert "not restarting: batch_size() is 21" in proc.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
