"""Pod deletion under a Kubeflow MPIJob (deploy/mpijob.yaml), on the test bed: two worker "pods" whose pid 1
is `entrypoint.sh sshd` and a launcher host that runs `entrypoint.sh mpirun ... entrypoint.sh` (mpirun starts
the entrypoint on the workers, which sees OMPI_COMM_WORLD_RANK and becomes one rank). A pod is deleted as
kubelet does it: SIGTERM to its pid 1, SIGKILL to whatever is left after the grace period."""

import os
import re
import signal
import sys
import time

import pytest
import testbed
from test_multihost import (
    BIN,
    KEEP,
    WHY_NOT,
    Watch,
    assert_same_metrics,
    command,
    model_def,
    run_on,
    validations,
)

pytestmark = [
    pytest.mark.skipif(WHY_NOT is not None, reason=f"two-host test bed: {WHY_NOT}"),
    pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "horovodrun")), reason="Horovod isn't installed"),
]

GRACE = 30  # the pods' terminationGracePeriodSeconds here (Kubernetes' default)
STOP_SECONDS = 20  # HARNESS_STOP_SECONDS: the entrypoints' wait for the checkpoint, below GRACE
STOP_LINE = re.compile(r"stopped by (.+?) at batch (\d+); checkpoint: (\S+)")


@pytest.fixture
def bed():
    env = {"HARNESS_VENV": sys.prefix, "HARNESS_STOP_SECONDS": str(STOP_SECONDS)}
    made = testbed.TestBed(("hosta", "hostb", "launcher"), keep=KEEP, pods=("hosta", "hostb"), pod_env=env)
    made.up()
    try:
        yield made
    finally:
        made.down()


def launcher_job(bed, output, epochs=4):
    """The MPIJob's launcher, as in deploy/mpijob.yaml: the entrypoint's mpirun mode, on the third host."""
    workers = bed.hosts[:2]
    env = {
        "HARNESS_VENV": sys.prefix,
        "HARNESS_MODEL_DEF": model_def(bed, epochs),
        "HARNESS_OUTPUT": output,
        "HARNESS_STOP_SECONDS": str(STOP_SECONDS),
    }
    argv = ["env", *(f"{k}={v}" for k, v in env.items()), testbed.ENTRYPOINT, "mpirun", "--allow-run-as-root",
            "-np", "4", "-H", bed.hosts_arg(workers), "-mca", "plm_rsh_args", f"-p {testbed.SSH_PORT}",
            "-mca", "btl_tcp_if_include", "eth0", "-mca", "oob_tcp_if_include", "eth0",
            "-x", "PATH", "-x", "HARNESS_VENV", "-x", "HARNESS_MODEL_DEF", "-x", "HARNESS_OUTPUT",
            testbed.ENTRYPOINT]  # fmt: skip
    return Watch(bed, bed.hosts[2], argv)


def stop_line(job):
    """(who stopped, batch, checkpoint) from rank 0's line; exactly one such line."""
    found = [STOP_LINE.search(line) for _, line in job.lines if not line.startswith("entrypoint:")]
    found = [m.groups() for m in found if m]
    assert len(found) == 1, job.text()
    return found[0][0], int(found[0][1]), found[0][2]


def test_deleting_every_pod_checkpoints_at_one_batch_and_the_new_job_resumes(bed):
    a, b, launcher = bed.hosts
    began = time.monotonic()
    # uninterrupted, np=4 on the first host (under MPI the same metrics as across hosts: test_multihost)
    run_on(bed, a, command(bed, "mpirun", os.path.join(bed.shared, "baseline"), "localhost:4", epochs=2))
    expected = validations(os.path.join(bed.shared, "baseline"))
    output = os.path.join(bed.shared, "out")
    job = launcher_job(bed, output, epochs=2)
    job.until("[training  ] batch     20")
    print(
        f"baseline {job.started - began:.1f} s, start-up to batch 20 {time.monotonic() - job.started:.1f} s"
    )
    # kubectl delete mpijob: every pod gets SIGTERM at once (the launcher's pid 1 is the entrypoint)
    deleted = time.monotonic()
    os.kill(testbed.TestBed._child(job.proc.pid), signal.SIGTERM)
    ends = bed.delete_pods([a, b], GRACE)
    status = job.finish(timeout=GRACE)
    launcher_s = time.monotonic() - deleted
    who, batch, checkpoint = stop_line(job)
    checkpointed = next(t for t, line in job.lines if STOP_LINE.search(line)) - deleted
    logs = {end.host.hostname: bed.sshd_log(end.host) for end in ends}
    print(
        f"every pod deleted at batch >= 20: stopped at batch {batch} by {who}, checkpoint "
        f"{checkpointed:.1f} s after SIGTERM; pods gone after "
        + ", ".join(f"{e.seconds:.1f} s" for e in ends)
        + f"; launcher after {launcher_s:.1f} s (status {status})"
    )
    for end in ends:
        assert end.killed == [] and end.status == 0, (end, logs)
        assert end.seconds < GRACE, end
        assert "the 2 rank(s) on this pod ended" in logs[end.host.hostname], logs
    assert status == 143, job.text()  # the MPIJob is not "Succeeded": training stopped before its end
    assert launcher_s < GRACE
    assert who in ("SIGTERM", "SIGUSR1") and batch >= 20
    assert checkpoint == f"{output}/checkpoints/{batch}" and os.path.isdir(checkpoint)
    # the job is created again: new pods, the same output
    restarted = time.monotonic()
    bed.restart_host(a, b)
    again = launcher_job(bed, output, epochs=2)
    assert again.finish(timeout=300) == 0, again.text()
    print(f"restart {again.started - restarted:.1f} s, resumed run {time.monotonic() - again.started:.1f} s")
    assert f"resuming from {output}/checkpoints/{batch} at batch {batch}" in again.text()
    assert_same_metrics(validations(output), expected)


def test_deleting_one_worker_pod_stops_the_job_with_a_checkpoint(bed):
    a, b, launcher = bed.hosts
    output = os.path.join(bed.shared, "out")
    job = launcher_job(bed, output, epochs=2)
    job.until("[training  ] batch     20")
    deleted = time.monotonic()
    (end,) = bed.delete_pods([b], GRACE)
    status = job.finish(timeout=GRACE)
    launcher_s = time.monotonic() - deleted
    who, batch, checkpoint = stop_line(job)
    print(
        f"one worker pod deleted: stopped at batch {batch} ({who}); pod gone after {end.seconds:.1f} s, "
        f"launcher ended after {launcher_s:.1f} s with status {status}"
    )
    assert end.killed == [] and end.status == 0 and end.seconds < GRACE, (end, bed.sshd_log(b))
    assert "the 2 rank(s) on this pod ended" in bed.sshd_log(b)
    # rank 0 is on the first pod, which got no signal: the ranks there stopped at the same batch
    assert who == "a stop request on another rank" and batch >= 20, job.text()
    assert checkpoint == f"{output}/checkpoints/{batch}" and os.path.isdir(checkpoint)
    assert status == 143 and launcher_s < GRACE, job.text()
    assert "the ranks stopped before the end of training" in job.text()
    assert a.unshare.poll() is None  # the other pod stays (its sshd), with no rank left
    assert "SIGTERM" not in bed.sshd_log(a)
