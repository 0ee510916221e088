"""`harness launch --backend torch`: real torchrun, real harness launch, on a machine where Horovod cannot be
imported (a shim on PYTHONPATH makes `import horovod` fail), as after `HARNESS_WITHOUT_HOROVOD=1 make setup`.
A transient failure is restarted from the newest checkpoint with one line, torchrun's own report left out;
SIGTERM checkpoints at an agreed batch; two torchrun agents (one per "machine", both here) train to the same
metrics; the default backend says in one line that Horovod is missing; one process trains samples/digits."""

import json
import os
import signal

import pytest
import runner
from conftest import SAMPLES, write_model_def
from test_long_runs import RESUME_CONFIG, RESUME_MODEL, start_and_wait_for_training

# The test model's rank, under torchrun too (RANK), whichever way the shared model reads it.
TORCH_MODEL = RESUME_MODEL.replace(
    'os.environ.get("OMPI_COMM_WORLD_RANK", "0")',
    'os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0"))',
)
assert '"RANK"' in TORCH_MODEL
TORCHRUN_NOISE = ("Traceback", "ChildFailedError", "Root Cause", "closing signal", "exitcode", "=====")


@pytest.fixture(scope="module")
def no_horovod(tmp_path_factory):
    """PYTHONPATH with a `horovod` package whose import fails, as where Horovod was never built."""
    shim = tmp_path_factory.mktemp("no-horovod")
    (shim / "horovod").mkdir()
    (shim / "horovod" / "__init__.py").write_text("raise ImportError('no Horovod here (test shim)')\n")
    return {"PYTHONPATH": str(shim)}


def _env(no_horovod, **extra):
    return dict(no_horovod, **extra)


def _validations(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "validation"]


def _console(proc):
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def restarted(no_horovod, tmp_path_factory):
    """2 ranks under torchrun, rank 1 raising once at its 5th batch: one restart from the checkpoint."""
    base = tmp_path_factory.mktemp("torch-restart")
    model_dir = write_model_def(base / "model", model_def=TORCH_MODEL, config=RESUME_CONFIG)
    output = base / "out"
    env = _env(no_horovod, CRASH_AT="5", MARKER=str(base / "crashed"))
    command = runner.harness("launch", "--backend", "torch", "-np", "2", model_dir, "--output", output)
    return runner.run(command, timeout=240, env=env), output, model_dir


def test_torch_backend_restarts_a_failure_in_one_line_without_horovod(restarted):
    proc, output, _ = restarted
    runner.assert_ok(proc)
    console = _console(proc)
    restarts = [line for line in console.splitlines() if line.startswith("harness launch: restart")]
    assert len(restarts) == 1, console[-3000:]
    assert "after failure: [rank 1] RuntimeError: injected crash (at " in restarts[0]
    assert not [n for n in TORCHRUN_NOISE if n in console], console[-3000:]
    assert "harness launch: " in proc.stdout and "torch.distributed.run --standalone" in proc.stdout
    assert "resuming from" in proc.stdout and "training on cpu with 2 ranks" in proc.stdout
    last = _validations(output)[-1]
    assert last["batches"] == 30 and last["metrics"]["accuracy"] > 0.5  # learnt: 10 classes, chance 0.1


def test_two_torchrun_agents_train_to_the_same_metrics(restarted, no_horovod, tmp_path):
    """-H with two hosts: one torchrun agent per host (--nnodes 2 --node-rank i, the first host as rendezvous
    endpoint); both name this machine, so neither needs ssh. The same validations as one agent of 2 ranks
    (that job was restarted from its checkpoint at batch 4 on the way)."""
    _, reference, model_dir = restarted
    output = tmp_path / "out"
    command = runner.harness(
        "launch", "--backend", "torch", "-H", "localhost:1,127.0.0.1:1", model_dir, "--output", output
    )
    proc = runner.run(command, timeout=240, env=_env(no_horovod))
    runner.assert_ok(proc)
    assert "harness launch: 2 torchrun agent(s) on localhost, 127.0.0.1" in proc.stdout
    got, want = _validations(output), _validations(reference)
    assert [r["batches"] for r in got] == [r["batches"] for r in want]
    for a, b in zip(got, want):
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-5)


def test_sigterm_under_torchrun_checkpoints_and_exits_zero(no_horovod, tmp_path):
    model_dir = write_model_def(
        tmp_path / "model",
        model_def=TORCH_MODEL,
        config=RESUME_CONFIG.replace("{batches: 30}", "{batches: 3000}"),
    )
    output = tmp_path / "out"
    command = runner.harness("launch", "--backend", "torch", "-np", "2", model_dir, "--output", output)
    proc = start_and_wait_for_training(command, _env(no_horovod, SLOW="0.05"), output)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "harness launch: stopped by SIGTERM; the job exited with status 0" in stdout
    stop = next(line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM at batch "))
    batch = int(stop.split()[5].rstrip(";"))
    assert (output / "checkpoints" / str(batch)).is_dir()
    assert not [n for n in TORCHRUN_NOISE if n in stdout + stderr], stderr[-2000:]


def test_default_backend_without_horovod_says_so_in_one_line(no_horovod, tmp_path):
    command = runner.harness(
        "launch", "-np", "2", os.path.join(SAMPLES, "digits"), "--output", tmp_path / "o"
    )
    proc = runner.run(command, timeout=60, env=_env(no_horovod))
    assert proc.returncode == 2
    lines = [line for line in _console(proc).splitlines() if line.strip()]
    assert len(lines) == 1 and "Horovod cannot be imported" in lines[0], lines
    assert "harness launch --backend torch" in lines[0]


def test_one_process_trains_samples_digits_without_horovod(no_horovod, tmp_path):
    """samples/digits as it is but for its length (2 epochs of 8: the test's time)."""
    digits = os.path.join(SAMPLES, "digits")
    with open(os.path.join(digits, "experiment.yaml")) as f:
        config = f.read()
    short = config.replace("    epochs: 8\n", "    epochs: 2\n")
    assert short != config
    (tmp_path / "short.yaml").write_text(short)
    output = tmp_path / "out"
    command = runner.harness(digits, "--config", tmp_path / "short.yaml", "--output", output)
    proc = runner.run(command, timeout=180, env=_env(no_horovod))
    runner.assert_ok(proc)
    assert "one process" in proc.stdout
    assert _validations(output)[-1]["metrics"]["accuracy"] > 0.8  # 10 classes: chance is 0.1


def test_agents_runner_status_and_the_end_of_a_remote_agent():
    """`python -m harness.launch.agents`, the launcher of several torchrun agents: without --elastic the first
    failing agent's status; with --watch-stdin (the remote side of ssh) the agent gets SIGTERM when stdin
    closes, as when harness launch or its machine is gone."""
    import subprocess
    import sys
    import time

    agents = [sys.executable, "-m", "harness.launch.agents"]
    failing = json.dumps([["sh", "-c", "sleep 0.5; exit 3"], ["sh", "-c", "sleep 1"]])
    assert subprocess.run([*agents, failing], timeout=30).returncode == 3
    elastic = json.dumps([["sh", "-c", "exit 0"], ["sh", "-c", "exit 4"]])  # the first agent's status
    assert subprocess.run([*agents, "--elastic", elastic], timeout=30).returncode == 0
    trapped = json.dumps([["sh", "-c", "sleep 60 & trap 'kill $!; exit 7' TERM; wait"]])
    proc = subprocess.Popen([*agents, "--watch-stdin", trapped], stdin=subprocess.PIPE)
    time.sleep(1)
    began = time.monotonic()
    proc.stdin.close()  # the ssh connection's end
    assert proc.wait(timeout=30) == 7 and time.monotonic() - began < 10
