"""Elastic membership on torchrun's agent (c10d rendezvous), on the two-host bed (testbed.py):
`harness launch --backend torch --min-np 1 --max-np 2 -H hosta:1,hostb:1` started on the first host (a
torchrun agent there and one on the second host by ssh). The second host is lost mid-epoch (every process
of it killed): the survivor's rank ends at once, its agent restarts it at world size 1 from the newest
checkpoint; the host comes back and the command that harness launch printed for adding a machine starts its
agent there: the running rank is stopped by its agent (SIGTERM: the agreed stop, a checkpoint) and both
restart at world size 2 from that checkpoint. The metrics at the end are those of the exact data position
throughout: each report's records are the records of the batches before it, at the world size that trained
them (the last batch of an epoch holds the sampler's padding at 2 ranks), every report once, in order.

The bed's hosts resolve each other's names here (torchrun's agent looks its own name up; see
docs/outputs-and-long-runs.md, Elastic membership).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import testbed
import yaml

from harness.output import lock as output_lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
KEEP = (ROOT, sys.prefix)
WHY_NOT = testbed.unavailable()
bed_needed = pytest.mark.skipif(WHY_NOT is not None, reason=f"two-host test bed: {WHY_NOT}")

AGENT_ENV = {
    "OMP_NUM_THREADS": "1",  # both hosts share this machine's cores
    "PYTHONUNBUFFERED": "1",
}
BATCH, PER_EPOCH, TRAIN_RECORDS = 64, 23, 1437  # digits: 1437 training records, global batch 64
EPOCHS = 30
PACED = '''
import os
import time

import digits_model

PACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pace")


class PacedDigits(digits_model.DigitsTrial):
    """The sample, at the pace the test sets: each batch sleeps the seconds in the file `pace`."""

    def losses(self, predictions, labels):
        try:
            with open(PACE) as f:
                pause = float(f.read() or 0)
        except (OSError, ValueError):
            pause = 0.0
        time.sleep(pause)
        return super().losses(predictions, labels)

    def training_metrics(self, predictions, labels, losses):
        # The mean label of each batch: a function of which records it holds, exact in binary at any split
        # of the batch over ranks (k/64 = (k1 + k2)/64), so the data order can be compared bit for bit.
        return {**super().training_metrics(predictions, labels, losses), "label_mean": labels.float().mean()}
'''


def model_def(bed):
    target = os.path.join(bed.shared, "model")
    shutil.copytree(os.path.join(ROOT, "samples", "digits"), target)
    os.rename(os.path.join(target, "model_def.py"), os.path.join(target, "digits_model.py"))
    with open(os.path.join(target, "model_def.py"), "w") as f:
        f.write(PACED)
    with open(os.path.join(target, "experiment.yaml")) as f:
        config = yaml.safe_load(f)
    config["searcher"]["max_length"] = {"epochs": EPOCHS}
    config["min_checkpoint_period"] = {"batches": 25}
    config["scheduling_unit"] = 10
    config["min_validation_period"] = {"epochs": 10}
    config["stall_timeout"] = 60
    config["checkpoint_storage"] = {"save_trial_latest": 100}  # all of them, for the test to read
    with open(os.path.join(target, "experiment.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    return target


def reports(output, kind="training"):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def pace(model, seconds):
    with open(os.path.join(model, "pace"), "w") as f:
        f.write(str(seconds))


class Job:
    """Commands on the bed's hosts; their output, line by line with its time, in one list."""

    def __init__(self, bed):
        self.bed = bed
        self.lines = []  # (time, tag, line)
        self._lock = threading.Lock()

    def start(self, host, tag, argv):
        proc = self.bed.popen(
            host, argv, cwd=ROOT, env=self.bed.env(**AGENT_ENV), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        threading.Thread(target=self._read, args=(tag, proc), daemon=True).start()
        return proc

    def _read(self, tag, proc):
        for line in proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), tag, line))

    def until(self, pattern, after=0.0, timeout=120):
        """The time of the first line after `after` that matches `pattern` (a regex), and its match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                seen = list(self.lines)
            for t, _, line in seen:
                found = re.search(pattern, line)
                if t >= after and found:
                    return t, found
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.text()}")

    def text(self, tail=12000):
        """The output so far (its last `tail` characters; None: all of it)."""
        with self._lock:
            return "".join(f"{tag}| {line}" for _, tag, line in self.lines)[-tail if tail else 0 :]


def records(batches, world):
    """Records trained in batches 1..`batches`, batch k at world size world(k): a full batch is 64; the
    last of an epoch has the rest, 29, plus at 2 ranks the DistributedSampler's one padding record."""
    total = 0
    for k in range(1, batches + 1):
        total += BATCH if k % PER_EPOCH else TRAIN_RECORDS % BATCH + (-TRAIN_RECORDS) % world(k)
    return total


@bed_needed
def test_lose_a_host_mid_epoch_then_add_it_back():
    bed = testbed.TestBed(keep=KEEP, names=True).up()
    try:
        _lose_and_add_back(bed)
    finally:
        bed.down()  # every process on both hosts (the agents and their ranks), the namespaces, the files


def _lose_and_add_back(bed):
    model, output = model_def(bed), os.path.join(bed.shared, "out")
    # The same training uninterrupted, in one process (its own copy of the model: never paced), meanwhile.
    alone = os.path.join(bed.shared, "alone")
    shutil.copytree(model, alone + "-model")
    with open(alone + ".log", "w") as log:
        uninterrupted = subprocess.Popen(
            [sys.executable, "-m", "harness", alone + "-model", "--output", alone], cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _elastic(bed, model, output)
        assert uninterrupted.wait(timeout=120) == 0, open(alone + ".log").read()[-3000:]
    finally:
        uninterrupted.kill()
        uninterrupted.wait()
    # Every report window without an epoch's end (whose last batch holds the sampler's padding at 2 ranks)
    # trained the same records as the uninterrupted run: the same mean label, bit for bit.
    expected = {r["batches"]: r["metrics"]["label_mean"] for r in reports(alone)}
    compared, before = 0, 0
    for r in reports(output):
        if not any(k % PER_EPOCH == 0 for k in range(before + 1, r["batches"] + 1)):
            assert r["metrics"]["label_mean"] == expected[r["batches"]], r
            compared += 1
        before = r["batches"]
    assert compared >= 30  # of 69 reports: 30 windows hold an epoch's end


def _elastic(bed, model, output):
    a, b = bed.hosts
    pace(model, 0.03)
    agents = Job(bed)
    launch = agents.start(a, "launch", [
        os.path.join(BIN, "harness"), "launch", "--backend", "torch", "--min-np", "1", "--max-np", "2",
        "-H", f"{a.hostname}:1,{b.hostname}:1", "--ssh-port", str(testbed.SSH_PORT),
        "--network-interface", "eth0", model, "--output", output,
    ])  # fmt: skip
    _, found = agents.until(r"harness launch: to add a machine, run there: (.+)$")
    join = found.group(1)
    agents.until(r"training on cpu with 2 ranks \(gloo\) under torch.distributed, global batch 64")
    agents.until(r"\[training  \] batch     60 ")  # mid-epoch 3 (batch 14 of 23), after checkpoint 50

    lost = time.monotonic()
    assert bed.kill_host(b)  # the agent of hostb and its rank: connections reset
    pace(model, 0.2)  # slow enough that the job is still training when hostb is back
    # The survivor's rank ends at once (its error line, unless the launcher's stop came first).
    ended, _ = agents.until(r"harness: error: |resuming at another number", after=lost)
    resumed, found = agents.until(r"resuming from \S+/checkpoints/(\d+) at batch", after=lost)
    at_one = int(found.group(1))
    trained, _ = agents.until(r"\[training  \] batch", after=resumed)
    said = agents.text(None)
    assert re.search(r"training on cpu(, one process| with 1 rank)", said)  # world size 1
    assert "the checkpoint was written by 2 ranks, this run has 1; the global batch stays 64" in said

    bed.restart_host(b)
    joined = time.monotonic()
    agent_b = agents.start(b, "hostb again", ["sh", "-c", join])
    stopped, found = agents.until(r"stopped by SIGTERM at batch (\d+); checkpoint", after=joined)
    at_two = int(found.group(1))
    both, _ = agents.until(r"training on cpu with 2 ranks", after=stopped)
    agents.until(rf"resuming from \S+/checkpoints/{at_two} at batch {at_two} ", after=stopped)
    again, _ = agents.until(r"\[training  \] batch", after=both)
    pace(model, 0)
    assert launch.wait(timeout=150) == 0, agents.text()
    assert agent_b.wait(timeout=30) == 0, agents.text()
    print(
        f"\nlost hostb: its rank ended {ended - lost:.1f} s later, training at world size 1 again after "
        f"{trained - lost:.1f} s (from checkpoint {at_one}); hostb back: training at world size 2 "
        f"{again - joined:.1f} s after its agent started (stopped at {at_two})"
    )
    said = agents.text(None)
    assert "the checkpoint was written by 1 rank, this run has 2; the global batch stays 64" in said

    # The checkpoints say who wrote them; the metrics are those of the exact data position.
    assert at_one % 25 == 0 and at_one % PER_EPOCH and at_one < at_two  # a mid-epoch checkpoint
    with open(os.path.join(output, "checkpoints", str(at_two), "state.json")) as f:
        assert json.load(f)["ranks"] == 1
    with open(os.path.join(output, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    total = EPOCHS * PER_EPOCH
    world = lambda k: 2 if k <= at_one or k > at_two else 1  # noqa: E731
    trained_rows = [r for r in rows if r["type"] == "training"]
    expected = sorted({*range(10, total + 1, 10), total})
    assert [r["batches"] for r in trained_rows] == expected  # every report once, in order
    for r in rows:
        assert r["records"] == records(r["batches"], world), r
    assert [r["batches"] for r in rows if r["type"] == "validation"] == [230, 460, 690]


def test_a_worker_of_the_same_job_waits_for_the_lock(tmp_path):
    """Under torchrun the output lock's record names the job (TORCHELASTIC_RUN_ID): rank 0 of the job's next
    round waits for the previous worker to let go of the lock (on NFS a lost machine's lock outlives it
    until its lease ends) instead of refusing; another job is refused at once, naming the holder."""
    holder = (
        "import sys, time; from harness.output.lock import OutputLock; OutputLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(float(sys.argv[2]))"
    )
    env = dict(os.environ, TORCHELASTIC_RUN_ID="job-1")
    first = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path), "1.5"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline() == "held\n"
        os.environ["TORCHELASTIC_RUN_ID"] = "job-2"
        with pytest.raises(output_lock.LockRefused, match=r"in use by another run \(pid \d+"):
            output_lock.OutputLock(str(tmp_path)).acquire()
        os.environ["TORCHELASTIC_RUN_ID"] = "job-1"
        started = time.monotonic()
        mine = output_lock.OutputLock(str(tmp_path))
        note = mine.acquire(job_wait=30)  # the holder ended without releasing it: as a killed worker does
        assert note is not None and "took over the lock" in note
        assert time.monotonic() - started > 0.5  # it waited for the holder
        with open(os.path.join(tmp_path, ".lock")) as f:
            assert json.load(f)["job"] == "job-1"
        mine.release()
    finally:
        os.environ.pop("TORCHELASTIC_RUN_ID", None)
        first.kill()
        first.wait()


def test_a_report_spanning_a_restart_at_another_world_size_weighs_every_batch_once():
    """The unreported window of a checkpoint written by 2 ranks (2 batches, each an entry per rank), resumed
    by 1 rank, which trains a third batch: the report is the mean over the 3 batches."""
    import torch

    from harness.distributed.local import Local
    from harness.train.state import TrainingMetrics

    saved = [{"loss": torch.tensor(1.0 + 1.0 + 3.0 + 3.0, dtype=torch.float64)}, {"loss": 4.0}]
    metrics = TrainingMetrics(torch.device("cpu"), "training")
    metrics.load_state_dict(saved, Local(), 2, saved_ranks=2)
    metrics.add(torch.tensor(5.0), None)
    assert metrics.report(Local(), 3)["loss"] == pytest.approx((1.0 + 3.0 + 5.0) / 3)
