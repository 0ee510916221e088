"""`harness launch` on bad input and failures (issue 26): an endless --config, a full disk, sys.exit() on one
rank, a clean refusal and the lock, a host that cannot be reached. Each ends with one line, its exit status,
in bounded time, and leaves no process of the job behind."""

import os
import shutil
import subprocess
import time

import psutil
import pytest
import runner
from conftest import GOOD_MODEL_DEF, write_model_def
from test_failures import RANK, error_lines, fill
from test_launchers import BIN

pytestmark = pytest.mark.skipif(
    shutil.which("horovodrun", path=BIN) is None, reason="Horovod is not installed (run `make setup`)"
)


def launch(np, output, *args, launcher="gloo", timeout=120):
    """`harness launch -np NP --launcher L ARGS --output OUTPUT`, run to its end: (process, seconds)."""
    chosen = ["--launcher", launcher] if launcher else []  # None: -np 1 runs without a launcher
    argv = [runner.HARNESS, "launch", "-np", str(np), *chosen, *map(str, args)]
    return runner.timed([*argv, "--output", str(output)], timeout=timeout)


def assert_nothing_left(output, within=5.0):
    """No process naming OUTPUT in its command line (launcher, ranks, `harness launch`) a few seconds on."""
    deadline = time.monotonic() + within
    while True:
        left = [
            p
            for p in psutil.process_iter(["cmdline", "status"])
            if p.pid != os.getpid()
            and p.info["status"] != psutil.STATUS_ZOMBIE
            and str(output) in " ".join(p.info["cmdline"] or [])
        ]
        if not left:
            return
        if time.monotonic() > deadline:
            for p in left:  # do not leave them to the next test
                try:
                    p.kill()
                except psutil.Error:
                    pass
            raise AssertionError(f"left behind: {[' '.join(p.info['cmdline'])[:200] for p in left]}")
        time.sleep(0.2)


def test_endless_or_directory_config_is_refused_at_once(model_dir, tmp_path):
    """The launch-side copy of a piped --config has the ranks' 1 MB limit (it read /dev/zero for ever)."""
    write_model_def(model_dir)
    output = tmp_path / "out"
    proc, seconds = launch(2, output, model_dir, "--config", "/dev/zero")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "harness: error: /dev/zero: the config file is more than 1 MB, over the 1 MB limit for a config; "
        "is it the right file?"
    )
    assert seconds < 30
    yes = f"{runner.HARNESS} launch -np 2 --launcher gloo {model_dir} --config <(yes) --output {output}"
    proc = runner.run(["bash", "-c", yes], timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the config file is more than 1 MB, over the 1 MB limit" in proc.stderr
    proc, _ = launch(2, output, model_dir, "--config", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"harness: error: config file {tmp_path} is a directory, not a YAML file"
    assert_nothing_left(output)


def test_full_disk_is_bad_input_not_retried(model_dir, tmp_path):
    """OUTPUT on a full 2 MiB tmpfs: refused with one line naming the path, exit 2, no restart; the ranks'
    failure records reach harness launch on their stderr (no file can be written)."""
    write_model_def(model_dir)
    output = tmp_path / "out"
    output.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(output)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        fill(output / "filler")  # full before the start: harness launch's own lock cannot be written
        proc, seconds = launch(2, output, model_dir, "--max-restarts", 3)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip() == f"harness: error: no space left on device writing {output}/.lock"
        assert seconds < 30

        # Room for the lock (the page it frees when truncated), none for the ranks: they fail at start.
        os.remove(output / "filler")
        (output / ".lock").write_text("{}" + " " * 100)
        fill(output / "filler")
        proc, seconds = launch(2, output, model_dir, "--max-restarts", 3)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        expected = f"no space left on device writing {output}/.harness/pids/rank0"
        assert f"harness launch: not restarting: {expected}" in proc.stdout, proc.stdout[-2000:]
        assert "restart " not in proc.stdout and "SIGKILL" not in proc.stdout
        assert error_lines(proc.stderr) and all(expected in line for line in error_lines(proc.stderr))
        assert "harness-failure-record" not in proc.stdout + proc.stderr  # the markers are left out
        assert seconds < 60
        assert_nothing_left(output)

        proc, _ = launch(1, output, model_dir, "--max-restarts", 3, launcher=None)  # one process, no launcher
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"harness launch: not restarting: {expected}" in proc.stdout, proc.stdout[-2000:]
        assert "restart " not in proc.stdout and "SIGKILL" not in proc.stdout
        assert_nothing_left(output)
    finally:
        if subprocess.run(["umount", str(output)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(output)], capture_output=True)


SYS_EXIT_ON_RANK_1 = GOOD_MODEL_DEF.replace(
    "    def losses(self, predictions, labels):\n",
    f"""    def losses(self, predictions, labels):
        import os, sys
        if {RANK} == "1":
            sys.exit(0)
""",
)


def test_sys_exit_on_one_rank_is_named_and_ends_the_job_at_once(model_dir, tmp_path):
    """sys.exit(0) on rank 1 only, under MPI: named with its place, the job ends non-zero without waiting
    ENDING_GRACE_SECONDS (it was blamed on SIGKILL / rank 0, and ended 10 s late)."""
    write_model_def(model_dir, model_def=SYS_EXIT_ON_RANK_1)
    output = tmp_path / "out"
    proc, seconds = launch(2, output, model_dir, "--max-restarts", 0, launcher="mpi")
    said = f"[rank 1] called sys.exit(0) at {model_dir}/model_def.py:21 in losses before the job ended"
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"harness launch: giving up after 0 restarts; last failure: {said}" in proc.stdout, proc.stdout
    assert error_lines(proc.stderr) == [f"[1,1]<stderr>:harness: error: {said}"], proc.stderr[-2000:]
    assert "the launcher did not end the job" not in proc.stdout
    assert seconds < 90
    assert_nothing_left(output)


SEGFAULT_ON_RANK_1 = GOOD_MODEL_DEF.replace(
    "    def losses(self, predictions, labels):\n",
    f"""    def losses(self, predictions, labels):
        import os, signal
        if {RANK} == "1":
            os.kill(os.getpid(), signal.SIGSEGV)
""",
)


def test_a_crashed_rank_ends_the_job_at_once(model_dir, tmp_path):
    """A rank's fatal signal under MPI (Open MPI reports it as it happens): harness launch ends the job and
    names the rank and the signal (mpirun alone took 60 s more: 72 s in all, measured)."""
    write_model_def(model_dir, model_def=SEGFAULT_ON_RANK_1)
    output = tmp_path / "out"
    proc, seconds = launch(2, output, model_dir, "--max-restarts", 0, launcher="mpi")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    cause = "last failure: rank 1 (pid "
    line = next((x for x in proc.stdout.splitlines() if cause in x), proc.stdout[-2000:])
    assert line.endswith(") was killed by SIGSEGV, without an error of its own"), line
    assert "did not end the job" not in proc.stdout
    assert seconds < 50
    assert_nothing_left(output)


def test_a_clean_refusal_releases_the_lock(model_dir, tmp_path):
    """A run that ends with its own error line (exit 2) leaves the lock free: the next run says nothing of
    taking it over."""
    write_model_def(model_dir, model_def="x = 1\n")
    output = tmp_path / "out"
    for _ in range(2):
        proc = runner.run(runner.training("local", 1, model_dir, output), timeout=60)
        assert proc.returncode == 2
        assert (
            proc.stderr.strip() == f"harness: error: {model_dir}/model_def.py: no PyTorchTrial subclass found"
        )
    assert (output / ".lock").read_text() == ""
    assert_nothing_left(output)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
def test_unreachable_host_is_one_line_per_attempt(model_dir, tmp_path):
    write_model_def(model_dir)
    output = tmp_path / "out"
    proc, seconds = runner.timed(
        [
            runner.HARNESS,
            "launch",
            "-np",
            "2",
            "-H",
            "nosuchhost.invalid:1,localhost:1",
            "--max-restarts",
            "1",
        ]
        + [str(model_dir), "--output", str(output)],
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    why = "cannot reach host nosuchhost.invalid (ssh: Could not resolve hostname nosuchhost.invalid"
    assert f"harness launch: restart 1 of 1 after failure: {why}" in proc.stdout, proc.stdout
    assert f"harness launch: giving up after 1 restarts; last failure: {why}" in proc.stdout, proc.stdout
    assert "ssh not successful" not in proc.stdout
    assert "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr
    assert seconds < 60
    assert_nothing_left(output)


def test_a_launcher_that_outlives_its_ranks_is_ended(model_dir, tmp_path):
    """Issue 24: horovodrun --gloo waits for the end of its ranks' output, which a process the model
    definition started (here a background `sleep`) holds open after the ranks exit: it ran on for the whole
    sleep (308 s for a 300 s one). harness launch ends it and those processes 10 s after the last rank."""
    marker = str(tmp_path / "still-here")
    background = (
        f"import subprocess\nsubprocess.Popen(['bash', '-c', 'exec -a {marker} sleep 170'])\n"
        + GOOD_MODEL_DEF
    )
    write_model_def(model_dir, model_def=background)
    output = tmp_path / "out"
    proc, seconds = launch(2, output, model_dir, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 100, seconds
    said = [line for line in proc.stdout.splitlines() if "still runs" in line]
    assert len(said) == 1 and said[0].startswith(
        "harness launch: every rank exited 10 s ago, but horovodrun (pid "
    )
    assert "results: " in proc.stdout
    assert not [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert_nothing_left(output)
