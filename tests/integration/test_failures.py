"""Failures under real launchers, two ranks: each ends the job with one line, in bounded time, and leaves no
process of the job behind. A stalled rank (the watchdog), a second run on the same --output (the lock), a
resume that does not fit the checkpoint, a full disk while checkpointing."""

import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import psutil
import pytest
import runner
from conftest import GOOD_CONFIG, GOOD_DATA, GOOD_MODEL_DEF, write_model_def
from test_launchers import BIN, assert_no_rank_traceback, assert_ok, reports
from test_long_runs import RESUME_CONFIG, RESUME_MODEL, horovodrun, run_with_env, start_and_wait_for_training

pytestmark = pytest.mark.skipif(
    shutil.which("horovodrun", path=BIN) is None, reason="Horovod is not installed (run `make setup`)"
)

# This rank under horovodrun, mpirun or torchrun.
RANK = 'os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))'

# Set-up (data, model) takes ~6.5 s of watchdog time per rank with two ranks on two cores, and counts against
# setup_timeout (a stall in make_data_loaders is tested too): 4 would end a healthy job in "set-up". 10
# leaves a margin. A stalled job then ends in about 20 s (28 s under --mpi): the launcher's start, start-up,
# the limit, the 2 s a rank other than 0 waits before it reports, and the launcher's teardown.
STALL_TIMEOUT = 10
STALL_BOUND = 35
STALL_CONFIG = GOOD_CONFIG + f"stall_timeout: {STALL_TIMEOUT}\nsetup_timeout: {STALL_TIMEOUT}\n"

# Rank 1 hangs in losses() at its 3rd training batch; rank 0 then waits for it in the gradient allreduce.
STALL_IN_LOSSES = GOOD_MODEL_DEF.replace(
    "    def losses(self, predictions, labels):\n",
    f"""    calls = 0

    def losses(self, predictions, labels):
        import os, time
        self.calls += predictions.requires_grad
        if {RANK} == "1" and self.calls == 3:
            time.sleep(600)
""",
)

STALL_IN_DATA = GOOD_DATA.replace(
    "    from sklearn.datasets import load_digits\n",
    f"""    import os, time
    if {RANK} == "1":
        time.sleep(600)
    from sklearn.datasets import load_digits
""",
)


def harness(model_dir, output, *extra):
    return runner.training("local", 1, model_dir, output, *extra)


def harness_launch(model_dir, output, *extra):
    return runner.training("launch-gloo", 2, model_dir, output, *extra)


def rank_pids(output):
    return [json.load(open(p))["pid"] for p in glob.glob(os.path.join(output, ".harness", "pids", "rank*"))]


def _alive(proc):
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_job_gone(output, pids, within=5.0):
    """Within a few seconds after the launcher returned, no rank (by its registered pid) and no process
    naming OUTPUT in its command line (launcher wrappers, `harness launch`) is left."""
    assert pids, "the ranks did not register their pids"
    deadline = time.monotonic() + within
    while True:
        left = []
        for pid in pids:
            try:
                left.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and str(output) in " ".join(p.info["cmdline"] or []):
                left.append(p)
        left = [p for p in left if _alive(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            names = [(p.pid, " ".join(p.cmdline())[:200]) for p in left if _alive(p)]
            for p in left:  # do not leave them to the next test
                try:
                    p.kill()
                except psutil.Error:
                    pass
            raise AssertionError(f"processes of the job left {within} s after it ended: {names}")
        time.sleep(0.2)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "harness: error:" in line]


def assert_one_stall_line(stderr):
    """One error line, rank 1's: rank 0, ended by the launcher or by the broken collective, reports no stall
    of its own (its watchdog is disarmed once it fails)."""
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# The stall watchdog


@pytest.mark.parametrize("how", ["horovodrun-gloo", "horovodrun-mpi", "launch-gloo"])
def test_stalled_rank_ends_the_job_naming_the_user_code(how, model_dir, tmp_path):
    write_model_def(model_dir, model_def=STALL_IN_LOSSES, config=STALL_CONFIG)
    output = tmp_path / "out"
    if how == "launch-gloo":
        cmd = harness_launch(model_dir, output, "--max-restarts", "0")
    else:
        cmd = horovodrun(how.split("-")[1], model_dir, output)
    proc, seconds = run_with_env(cmd, {}, timeout=90)
    everything = proc.stdout + proc.stderr
    assert proc.returncode != 0, everything[-3000:]
    assert seconds < STALL_BOUND, seconds
    lines = [line for line in proc.stderr.splitlines() if "[rank 1] no progress for" in line]
    assert len(lines) == 1, everything[-3000:]
    assert "in training: stuck in losses() at " in lines[0] and "model_def.py:" in lines[0], lines[0]
    assert f"(stall_timeout {STALL_TIMEOUT} s)" in lines[0]
    assert_no_rank_traceback(proc.stderr)
    if how == "launch-gloo":
        assert "harness launch: giving up after 0 restarts; last failure: " in proc.stdout, proc.stdout
        assert "no progress for" in proc.stdout.split("giving up after 0 restarts")[1]
        assert "harness launch: restart " not in proc.stdout
    assert_job_gone(output, rank_pids(output))
    assert_one_stall_line(proc.stderr)


def test_stall_in_make_data_loaders(model_dir, tmp_path):
    write_model_def(model_dir, data=STALL_IN_DATA, config=STALL_CONFIG)
    output = tmp_path / "out"
    proc, seconds = run_with_env(horovodrun("gloo", model_dir, output), {}, timeout=90)
    assert proc.returncode != 0
    assert seconds < STALL_BOUND, seconds
    lines = [line for line in error_lines(proc.stderr) if "[rank 1] no progress for" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "stuck in make_data_loaders() at " in lines[0] and "data.py:" in lines[0], lines
    assert_no_rank_traceback(proc.stderr)
    assert_job_gone(output, rank_pids(output))
    assert_one_stall_line(proc.stderr)


def test_a_slow_set_up_is_not_a_stall_of_training(model_dir, tmp_path):
    """stall_timeout is for batches: an optimizer that takes longer than it to build (a busy machine) is
    set-up, which has its own limit (setup_timeout, default 600 s)."""
    slow_optimizer = GOOD_MODEL_DEF.replace(
        "    def optimizer(self, model):\n",
        "    def optimizer(self, model):\n        import time; time.sleep(4)\n",
    )
    write_model_def(model_dir, model_def=slow_optimizer, config=GOOD_CONFIG + "stall_timeout: 1\n")
    proc, _ = run_with_env(harness(model_dir, tmp_path / "out"), {}, timeout=90)
    assert_ok(proc)
    assert "no progress for" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------
# One run per output directory


def test_second_run_on_the_same_output_is_refused(model_dir, tmp_path):
    write_model_def(
        model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG.replace("{batches: 30}", "{batches: 3000}")
    )
    output = tmp_path / "out"
    first = start_and_wait_for_training(horovodrun("gloo", model_dir, output), {"SLOW": "0.02"}, output)
    try:
        pids = rank_pids(output)
        assert len(pids) == 2
        rank0 = json.loads((output / ".harness" / "pids" / "rank0").read_text())["pid"]
        second, seconds = run_with_env(harness(model_dir, output), {}, timeout=60)
        assert second.returncode == 2, second.stderr[-2000:]
        assert seconds < 15, seconds
        assert len(error_lines(second.stderr)) == 1, second.stderr[-2000:]
        host = socket.gethostname()
        expected = f"output directory {output} is in use by another run (pid {rank0} on {host}"
        assert expected in second.stderr, second.stderr[-2000:]
        assert first.poll() is None, "the refused run disturbed the first one"
        stray = output / ".harness" / "failure-rank0.json"
        stray_record = json.loads(stray.read_text()) if stray.exists() else None
        for pid in pids:  # SIGTERM to the ranks, as a scheduler does (see test_long_runs)
            os.kill(pid, signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, stdout[-2000:] + stderr[-2000:]
    lines = [line for line in stdout.splitlines() if "stopped by SIGTERM at batch" in line]
    assert lines, stdout[-2000:]
    from harness.output import checkpoint

    assert checkpoint.verify(lines[0].split("checkpoint: ")[1].strip()) is None
    assert_job_gone(output, pids)
    # The refused run must not write into the running job's bookkeeping (a supervisor would read it).
    assert stray_record is None, stray_record


def test_stale_lock_is_taken_over(model_dir, tmp_path):
    write_model_def(model_dir, model_def=RESUME_MODEL, config=RESUME_CONFIG)
    output = tmp_path / "out"
    cmd = harness(model_dir, output)
    first = start_and_wait_for_training(cmd, {"SLOW": "0.1"}, output)
    deadline = time.monotonic() + 30
    while not (output / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    first.kill()  # SIGKILL mid-training: the lock file still names it
    first.communicate(timeout=30)
    assert (output / "checkpoints" / "latest").exists(), "no checkpoint before the kill"
    assert json.loads((output / ".lock").read_text())["pid"] == first.pid

    proc, seconds = run_with_env(cmd, {}, timeout=120)  # the same command again
    assert_ok(proc)
    assert proc.stderr.count("took over the lock") == 1, proc.stderr[-2000:]
    assert f"took over the lock of {output} left by pid {first.pid} on {socket.gethostname()}" in proc.stderr
    assert f"resuming from {output}/checkpoints/" in proc.stdout, proc.stdout[-2000:]
    assert reports(output, "validation")[-1]["batches"] == 30
    assert not (output / ".lock").read_text().strip()  # a clean end leaves the lock unclaimed
    assert_job_gone(output, [first.pid, *rank_pids(output)])


# ---------------------------------------------------------------------------------------------------------
# Resume refuses what does not fit the checkpoint


def trained(model_dir, output, **changes):
    """A local run of 6 batches into `output`; then the model definition in `model_dir` changed."""
    write_model_def(model_dir)
    proc, _ = run_with_env(harness(model_dir, output), {})
    assert_ok(proc)
    write_model_def(model_dir, **changes)
    return os.path.join(output, "checkpoints", "6")


def assert_refused(proc, seconds, *parts):
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert seconds < 30, seconds
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]
    assert_no_rank_traceback(proc.stderr)


def test_resume_refuses_a_changed_hyperparameter(model_dir, tmp_path):
    output = tmp_path / "out"
    ckpt = trained(model_dir, output, config=GOOD_CONFIG.replace("  batch: 20\n", "  batch: 20\n  lr: 0.5\n"))
    proc, seconds = run_with_env(horovodrun("gloo", model_dir, output), {}, timeout=90)
    assert_refused(proc, seconds, f"cannot resume from {ckpt}", "hyperparameters.lr", "--fresh")
    assert_job_gone(output, rank_pids(output))

    proc, seconds = run_with_env(harness_launch(model_dir, output), {}, timeout=90)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert seconds < 30, seconds
    assert f"harness launch: not restarting: cannot resume from {ckpt}" in proc.stdout, proc.stdout[-2000:]
    assert "hyperparameters.lr" in proc.stdout
    assert "harness launch: restart " not in proc.stdout
    assert_job_gone(output, rank_pids(output))
    assert (output / "checkpoints" / "latest").read_text().strip() == "6"


def test_resume_refuses_a_changed_layer_but_allows_training_longer(model_dir, tmp_path):
    output = tmp_path / "out"
    wider = GOOD_MODEL_DEF.replace("nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)",
                                   "nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10)")  # fmt: skip
    assert wider != GOOD_MODEL_DEF
    ckpt = trained(model_dir, output, model_def=wider)
    proc, seconds = run_with_env(horovodrun("gloo", model_dir, output), {}, timeout=90)
    assert_refused(
        proc, seconds, f"cannot resume from {ckpt}: the model does not fit its weights: 1.weight", "--fresh"
    )
    assert_job_gone(output, rank_pids(output))

    write_model_def(model_dir, config=GOOD_CONFIG.replace("{batches: 6}", "{batches: 12}"))
    proc, _ = run_with_env(horovodrun("gloo", model_dir, output), {}, timeout=90)
    assert_ok(proc)
    assert "resuming with a changed config: searcher.max_length" in proc.stdout, proc.stdout[-2000:]
    assert f"resuming from {ckpt} at batch 6" in proc.stdout
    assert reports(output, "validation")[-1]["batches"] == 12
    assert_job_gone(output, rank_pids(output))


# ---------------------------------------------------------------------------------------------------------
# A full disk while checkpointing


def fill(path):
    """Write `path` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break


def test_full_disk_while_checkpointing(model_dir, tmp_path):
    output = tmp_path / "out"
    root = output / "checkpoints"
    write_model_def(model_dir, config=GOOD_CONFIG.replace("{batches: 6}", "{batches: 4}"))
    proc, _ = run_with_env(harness(model_dir, output), {})
    assert_ok(proc)
    # OUTPUT/checkpoints onto a 2 MiB tmpfs, with the checkpoint of batch 4 (a run never finds it empty:
    # it would move an empty checkpoints folder aside, which a mount point refuses).
    saved = output / "checkpoints-on-disk"
    root.rename(saved)
    root.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)]
    mounted = subprocess.run(mount, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        shutil.copytree(saved, root, dirs_exist_ok=True)
        assert (root / "latest").read_text().strip() == "4"
        fill(root / "filler")
        write_model_def(model_dir, config=GOOD_CONFIG.replace("{batches: 6}", "{batches: 8}"))
        expected = (
            f"no space left on the device of {root} while writing checkpoint 8; "
            "the previous checkpoint (4) is intact"
        )
        for launcher in ("gloo", "mpi"):
            proc, seconds = run_with_env(horovodrun(launcher, model_dir, output), {}, timeout=90)
            assert_refused(proc, seconds, expected)
            assert not glob.glob(str(root / ".tmp-*")) and not glob.glob(str(root / "latest.tmp-*"))
            assert (root / "latest").read_text().strip() == "4"
            assert_job_gone(output, rank_pids(output))

        proc, seconds = run_with_env(harness_launch(model_dir, output), {}, timeout=90)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"harness launch: not restarting: {expected}" in proc.stdout, proc.stdout[-2000:]
        assert "harness launch: restart " not in proc.stdout
        assert not glob.glob(str(root / ".tmp-*"))
        assert_job_gone(output, rank_pids(output))

        os.remove(root / "filler")
        proc, _ = run_with_env(horovodrun("gloo", model_dir, output), {}, timeout=90)
        assert_ok(proc)
        assert f"resuming from {root}/4 at batch 4" in proc.stdout, proc.stdout[-2000:]
        assert (root / "latest").read_text().strip() == "8"
        assert_job_gone(output, rank_pids(output))
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)
