"""The guards against silent failures, in one process: resume checks, the output lock, the stall watchdog,
and checkpoint write errors (the launcher side is in tests/integration/test_failures.py)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import runner
import torch
from conftest import GOOD_CONFIG, GOOD_MODEL_DEF, write_model_def

from harness import config, definition, distributed
from harness.distributed import watchdog
from harness.errors import HarnessError
from harness.output import checkpoint
from harness.output import lock as outputlock
from harness.train import loop, resume


def train_local(directory, output):
    cfg = config.load_config(config.find_config_file(str(directory)))
    return loop.train(definition.load(str(directory)), cfg, str(output), distributed.Local())


# ----------------------------------------------------------------------------------------------------------
# Resume: what may change


def test_resume_refuses_changed_hyperparameters(model_dir, tmp_path):
    write_model_def(model_dir)
    train_local(model_dir, tmp_path)
    write_model_def(model_dir, config=GOOD_CONFIG.replace("batch: 20", "batch: 20\n  lr: 0.5"))
    with pytest.raises(HarnessError) as info:
        train_local(model_dir, tmp_path)
    message = str(info.value)
    assert "cannot resume from" in message and "hyperparameters.lr (None -> 0.5)" in message
    assert "--fresh" in message and "\n" not in message


def test_resume_allows_training_further_and_says_so(model_dir, tmp_path, capsys):
    write_model_def(model_dir)
    train_local(model_dir, tmp_path)
    write_model_def(model_dir, config=GOOD_CONFIG.replace("{batches: 6}", "{batches: 9}"))
    train_local(model_dir, tmp_path)
    out = capsys.readouterr().out
    assert "resuming with a changed config: searcher.max_length.batches 6 -> 9" in out
    assert checkpoint.checkpoint_dirs(str(tmp_path / "checkpoints"))[0] == 9


def test_resume_refuses_a_changed_layer(model_dir, tmp_path):
    write_model_def(model_dir)
    train_local(model_dir, tmp_path)
    other = write_model_def(
        tmp_path / "model2",
        model_def=GOOD_MODEL_DEF.replace(
            "Linear(64, 32), nn.Tanh(), nn.Linear(32", "Linear(64, 48), nn.Tanh(), nn.Linear(48"
        ),
    )
    with pytest.raises(
        HarnessError, match=r"the model does not fit its weights: 1\.weight has shape \(48, 64\)"
    ):
        train_local(other, tmp_path)


def test_check_config_keeps_a_drawn_seed_and_ignores_cluster_keys():
    saved = {"hyperparameters": {"a": 1}, "reproducibility": {"experiment_seed": 7}, "resources": {"x": 1}}
    now = {"hyperparameters": {"a": 1}, "reproducibility": {"experiment_seed": None}, "resources": {"x": 2}}
    assert resume.check_config(saved, now, "ck") == "resuming with a changed config: resources.x 1 -> 2"
    now["reproducibility"]["experiment_seed"] = 8
    with pytest.raises(HarnessError, match="reproducibility.experiment_seed"):
        resume.check_config(saved, now, "ck")


# ----------------------------------------------------------------------------------------------------------
# One run per output directory


@pytest.mark.integration  # starts the harness (or a script) as its own process
def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    holder = runner.start(
        [sys.executable, "-c", "import sys, time; from harness.output.lock import OutputLock; "
         f"OutputLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HarnessError, match=rf"in use by another run \(pid {holder.pid} on "):
            outputlock.OutputLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: the lock is free, and taking it over is said.
    lock = outputlock.OutputLock(str(tmp_path))
    note = lock.acquire()
    assert note and f"left by pid {holder.pid}" in note and "no longer runs" in note
    lock.release()
    assert outputlock.OutputLock(str(tmp_path)).acquire() is None  # a clean release leaves no claim


def test_ranks_of_the_supervisor_holding_the_lock_pass(tmp_path, monkeypatch):
    lock = outputlock.OutputLock(str(tmp_path))
    lock.acquire()
    monkeypatch.setenv(outputlock.HOLDER_ENV, str(os.getpid()))  # a pid alone: another machine's could match
    with pytest.raises(HarnessError, match="in use by another run"):
        outputlock.OutputLock(str(tmp_path)).acquire()
    monkeypatch.setenv(outputlock.HOLDER_ENV, lock.holder)  # pid@host, as harness launch sets it
    assert outputlock.OutputLock(str(tmp_path)).acquire() is None
    lock.release()


# ----------------------------------------------------------------------------------------------------------
# The stall watchdog


def test_watchdog_names_the_user_function_a_rank_is_stuck_in(tmp_path):
    user_dir = tmp_path / "model"
    user_dir.mkdir()
    (user_dir / "slow.py").write_text("import time\n\ndef losses():\n    time.sleep(3)\n")
    sys.path.insert(0, str(user_dir))
    try:
        import slow
    finally:
        sys.path.remove(str(user_dir))
    said = []
    done = threading.Event()

    def on_stall(message, waiting):
        said.append((message, waiting))
        done.set()

    dog = watchdog.Watchdog(1, 0.5, str(user_dir), on_stall, poll_seconds=0.1)
    dog.phase("training")
    start = time.monotonic()
    slow.losses()  # the main thread is "stuck" here while the watchdog looks
    assert done.wait(5)
    message, waiting = said[0]
    assert not waiting and 0.5 <= time.monotonic() - start
    assert "in training: stuck in losses() at" in message and "slow.py:4" in message
    assert "(stall_timeout 0.5 s)" in message


def test_watchdog_stays_quiet_while_beats_come(tmp_path):
    said = []
    dog = watchdog.Watchdog(0, 0.3, str(tmp_path), lambda m, w: said.append(m), poll_seconds=0.05)
    for _ in range(20):
        dog.beat()
        time.sleep(0.05)
    assert said == []
    dog.phase("download_data()", limit=60)
    time.sleep(0.5)
    assert said == []  # a phase's own, longer limit


def test_watchdog_gives_set_up_its_own_limit(tmp_path):
    said = []
    dog = watchdog.Watchdog(0, 0.2, str(tmp_path), lambda m, w: said.append(m), 0.05, setup_timeout=30)
    dog.phase(watchdog.SETUP)
    time.sleep(0.5)
    assert said == []  # past stall_timeout, inside setup_timeout
    dog.phase("training")
    time.sleep(0.5)
    assert len(said) == 1 and "in training:" in said[0] and "(stall_timeout 0.2 s)" in said[0]


# ----------------------------------------------------------------------------------------------------------
# Checkpoint write errors


def test_a_failed_checkpoint_write_leaves_nothing_partial(tmp_path, monkeypatch):
    root = str(tmp_path / "checkpoints")
    state = {"progress": {}}
    checkpoint.save(root, 2, state, {"w": torch.zeros(2)}, {}, {})
    real_save = torch.save

    def failing(obj, path):
        if path.endswith("optimizer.pt"):
            raise OSError(5, "Input/output error", path)
        return real_save(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", failing)
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        checkpoint.save(root, 4, state, {"w": torch.zeros(2)}, {}, {})
    assert "Input/output error" in str(info.value) and "while writing checkpoint 4" in str(info.value)
    assert "the previous checkpoint (2) is intact" in str(info.value)
    assert sorted(os.listdir(root)) == ["2", "latest"]
    assert open(os.path.join(root, "latest")).read().strip() == "2"


def test_stale_partial_checkpoints_are_removed_at_start(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    (root / ".tmp-8-1234").mkdir(parents=True)
    (root / "latest.tmp-1234").write_text("8\n")
    assert checkpoint.prepare_output(str(tmp_path), fresh=False, resume_from=None).ckpt is None
    assert not os.path.exists(root / ".tmp-8-1234") and not os.path.exists(root / "latest.tmp-1234")
    assert "removed 2 partial checkpoint file(s)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# The same error on every rank, said once


def test_a_rank_stays_quiet_when_rank_0_said_the_same_error_in_this_run(tmp_path):
    from harness import cli
    from harness.output import jobstate

    out = str(tmp_path)
    assert not cli._rank0_said(out, "bad batch")  # no record: this rank says it
    jobstate.record_failure(out, "bad batch", 2, 0, consequential=False)
    assert cli._rank0_said(out, "bad batch")
    assert not cli._rank0_said(out, "another error")  # its own error is said with its [rank N]
    assert not cli._rank0_said(None, "bad batch")
    path = os.path.join(jobstate.state_dir(out), "failure-rank0.json")
    record = json.load(open(path))
    record["time"] = cli._STARTED - 3600  # an earlier run's record left in OUTPUT
    json.dump(record, open(path, "w"))
    assert not cli._rank0_said(out, "bad batch")
