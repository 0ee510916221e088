"""Stops that must leave nothing behind: Ctrl-C everywhere, and a launcher that dies under its ranks."""

import json
import os
import signal
import subprocess
import time

import pytest
import runner
from conftest import write_model_def
from test_launchers import command, reports
from test_long_runs import RESUME_CONFIG, RESUME_MODEL, sigterm_when_marked, start_and_wait_for_training

from harness.output import checkpoint

LONG = RESUME_CONFIG.replace("{batches: 30}", "{batches: 3000}")


def rank_pids(output):
    directory = output / ".harness" / "pids"
    return [json.loads((directory / name).read_text())["pid"] for name in sorted(os.listdir(directory))]


def wait_gone(pids, seconds):
    """Seconds until every pid is gone (or None if some are still alive after `seconds`)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(pid)
            except OSError:
                pass
        if not alive:
            return time.monotonic() - start
        time.sleep(0.2)
    return None


def stop_line(output):
    newest = checkpoint.checkpoint_dirs(str(output / "checkpoints"))
    return newest[0] if newest else None


def test_ctrl_c_in_one_process_checkpoints_and_exits_130(model_dir, tmp_path):
    write_model_def(model_dir, model_def=RESUME_MODEL, config=LONG)
    output = tmp_path / "out"
    cmd = command("local", 1, model_dir, output)
    proc = start_and_wait_for_training(cmd, {"SLOW": "0.02"}, output)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    line = next(x for x in stdout.splitlines() if x.startswith("stopped by SIGINT at batch "))
    assert checkpoint.verify(line.split("checkpoint: ")[1].strip()) is None


def training_under_harness_launch(model_dir, output):
    """`harness launch` (gloo, 2 ranks) of a long run, once it trains; returns (the process, rank pids)."""
    write_model_def(model_dir, model_def=RESUME_MODEL, config=LONG)
    proc = start_and_wait_for_training(command("launch-gloo", 2, model_dir, output), {"SLOW": "0.02"}, output)
    return proc, rank_pids(output)


def test_ctrl_c_to_harness_launch_stops_the_job_and_exits_130(model_dir, tmp_path):
    output = tmp_path / "out"
    proc, pids = training_under_harness_launch(model_dir, output)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "harness launch: stopped by SIGINT" in stdout
    assert wait_gone(pids, 10) is not None
    assert stop_line(output) is not None


def test_sigkill_of_harness_launch_leaves_no_rank(model_dir, tmp_path):
    output = tmp_path / "out"
    proc, pids = training_under_harness_launch(model_dir, output)
    proc.kill()
    proc.communicate(timeout=30)
    gone_after = wait_gone(pids, 30)
    assert gone_after is not None, "ranks still running 30 s after their supervisor was SIGKILLed"
    saved = stop_line(output)
    assert saved is not None and saved >= 1  # they agreed on a batch and checkpointed it
    # The next run resumes from that checkpoint.
    assert reports(output, "training")


def test_sigterm_to_horovodrun_mpi_leaves_no_rank(model_dir, tmp_path):
    """horovodrun --mpi becomes `sh -c mpirun ...`; SIGTERM ends that shell at once and mpirun lives on."""
    write_model_def(model_dir, model_def=RESUME_MODEL, config=LONG)
    output = tmp_path / "out"
    cmd = command("mpi", 2, model_dir, output)
    proc = start_and_wait_for_training(cmd, {"SLOW": "0.02"}, output)
    pids = rank_pids(output)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    gone_after = wait_gone(pids, 30)
    assert gone_after is not None, "ranks still running 30 s after horovodrun --mpi was terminated"
    assert stop_line(output) is not None
    leftover = subprocess.run(["pgrep", "-f", f"--output {output}"], capture_output=True, text=True)
    assert (
        leftover.stdout.strip() == "" or wait_gone([int(p) for p in leftover.stdout.split()], 10) is not None
    )


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_sigterm_to_mpirun_leaves_no_rank(model_dir, tmp_path):
    """Plain mpirun forwards SIGTERM to the ranks and kills them 1 s later (odls_base_sigkill_timeout)."""
    write_model_def(model_dir, model_def=RESUME_MODEL, config=LONG)
    output = tmp_path / "out"
    cmd = runner.training("mpirun", 2, model_dir, output, forward=("SLOW",))
    proc = start_and_wait_for_training(cmd, {"SLOW": "0.02"}, output)
    pids = rank_pids(output)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert wait_gone(pids, 30) is not None, "ranks still running 30 s after mpirun was terminated"


SLOW_DOWNLOAD = """
def download_data(config, hparams):
    import os, time
    open(os.environ["MARKER"], "a").close()
    time.sleep(120)
    return "/nonexistent"
"""


# Under MPI a rank ends here right after the download exchange (mpi4py): before Horovod.shutdown's barrier,
# 1 run in 4 segfaulted at exit (job status 139) when the other rank's shutdown finalized MPI under it.
@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_sigterm_during_download_data_stops_within_seconds(launcher, model_dir, tmp_path):
    from conftest import GOOD_DATA

    write_model_def(model_dir, data=GOOD_DATA + SLOW_DOWNLOAD)
    output, marker = tmp_path / "out", tmp_path / "downloading"
    cmd = command(f"launch-{launcher}", 2, model_dir, output)
    proc = runner.start(cmd, {"MARKER": str(marker)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "download_data did not start"
    pids = rank_pids(output)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < 15, stdout[-2000:]
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "stopped by SIGTERM during download_data(); nothing trained yet" in stdout
    assert wait_gone(pids, 10) is not None


SLOW_FULL_DATASET = """
import os, time
import torch
from torch import nn
import harness


class Trial(harness.PyTorchTrial):
    def build_model(self, hparams):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def train_batch(self, batch, model, epoch_idx, batch_idx):
        time.sleep(0.02)
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def evaluate_full_dataset(self, data_loader, model):
        open(os.environ["MARKER"], "a").close()
        time.sleep(120)
        return {"x": 1.0}
"""


def test_sigterm_during_evaluate_full_dataset_abandons_it(model_dir, tmp_path):
    write_model_def(
        model_dir,
        model_def=SLOW_FULL_DATASET,
        config=LONG.replace("batch: 20", "global_batch_size: 20").replace("metric: accuracy", "metric: x"),
    )
    output, marker = tmp_path / "out", tmp_path / "evaluating"
    cmd = command("launch-gloo", 2, model_dir, output)
    proc, stdout, stderr, seconds = sigterm_when_marked(cmd, marker, output, "evaluate_full_dataset")
    assert seconds < 15, stdout[-2000:]
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "stopped by SIGTERM at batch 5;" in stdout, stdout[-2000:]
    assert stop_line(output) == 5
    assert [e for e in reports(output, "validation") if e["batches"] == 5] == []
