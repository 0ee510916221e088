"""The CPU image, built as CI builds it (imagekit.py), training samples/digits inside through entrypoint.sh.

Each test runs commands in a fresh container of the image (`buildah run`, or `docker run`) with /model_def
and /output bound. Set HARNESS_SKIP_IMAGE_TESTS=1 to skip them.
"""

import os
import re
import secrets
import shutil
import socket

import pytest
from imagekit import (
    DIGITS,
    ENGINE,
    ENTRYPOINT,
    assert_trained_digits,
    build,
    image_config,
    needs_engine,
    output_dir,
    run_in_image,
    validation,
)

IMAGE = os.environ.get("HARNESS_TEST_IMAGE", "localhost/harness:cpu-test")
pytestmark = needs_engine


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    seconds = build("cpu", IMAGE, tmp_path_factory.mktemp("image") / "build.log")
    print(f"\nimage {IMAGE} built with {ENGINE} in {seconds:.0f} s")
    return IMAGE


def test_runs_as_a_non_root_user(image):
    proc = run_in_image(image, "id", "-u")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1000"
    assert image_config(image)["User"] == "1000"  # numeric: Kubernetes' runAsNonRoot can check it


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_entrypoint_trains_digits_on_two_processes(image, tmp_path, launcher):
    out = output_dir(tmp_path)
    proc = run_in_image(
        image,
        ENTRYPOINT,
        env={"HARNESS_NP": "2", "HARNESS_LAUNCHER": launcher},
        mounts=[f"{DIGITS}:/model_def:ro", f"{out}:/output"],
    )
    assert_trained_digits(proc, out)
    assert f"horovodrun -np 2 -H localhost:2 --{launcher} " in proc.stderr
    assert f"2 ranks ({launcher})" in proc.stdout


def test_determined_trial_and_trainer_script_in_the_image(image, tmp_path):
    """Determined's trial API through the entrypoint (its const.yaml found by name), and a Trainer script
    run with the image's python under horovodrun (`import determined` through harness-compat.pth)."""
    samples = os.path.dirname(DIGITS)
    out = output_dir(tmp_path, "trial")
    proc = run_in_image(
        image,
        ENTRYPOINT,
        env={"HARNESS_NP": "2", "HARNESS_LAUNCHER": "gloo"},
        mounts=[f"{os.path.join(samples, 'determined_digits')}:/model_def:ro", f"{out}:/output"],
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "trial API context (Determined)" in proc.stdout
    assert validation(out)[-1]["metrics"]["accuracy"] > 0.8
    out = output_dir(tmp_path, "script")
    proc = run_in_image(
        image,
        "horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "python", "/model_def/train.py",
        env={"HARNESS_OUTPUT_DIR": "/output"},
        mounts=[f"{os.path.join(samples, 'determined_trainer')}:/model_def:ro", f"{out}:/output"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert validation(out)[-1]["batches"] == 135


@pytest.mark.parametrize(
    "launcher",
    [
        ("mpirun", "-np", "2"),  # as a Kubeflow MPIJob's launcher runs it
        ("horovodrun", "--gloo", "-np", "2", "-H", "localhost:2"),
    ],
    ids=["mpirun", "horovodrun-gloo"],
)
def test_inside_a_launcher_the_entrypoint_is_one_rank(image, tmp_path, launcher):
    out = output_dir(tmp_path)
    proc = run_in_image(image, *launcher, ENTRYPOINT, mounts=[f"{DIGITS}:/model_def:ro", f"{out}:/output"])
    assert_trained_digits(proc, out)
    assert len(re.findall(r"entrypoint: inside a launcher \(\w+_RANK=[01]\)", proc.stderr)) == 2
    assert "horovodrun -np" not in proc.stderr  # no second launcher


def test_gloo_with_an_unresolvable_hostname(image, tmp_path):
    """Regression: Horovod's Gloo context resolved the hostname and crashed where it did not resolve.

    The image keeps its hostname resolvable (libnss-myhostname); here that is switched off, so the patched
    Horovod (scripts/horovod-patches/0002, 0003) is what keeps the job alive.
    """
    out = output_dir(tmp_path)
    script = (
        "sed -i 's/ myhostname//' /etc/nsswitch.conf"
        ' && if getent hosts "$(hostname)"; then echo "hostname resolves"; exit 99; fi'
        " && exec setpriv --reuid=1000 --regid=1000 --init-groups"
        f" env HOME=/home/harness USER=harness {ENTRYPOINT}"
    )
    proc = run_in_image(
        image,
        "bash",
        "-c",
        script,
        user="root",
        hostname=f"harness-unresolvable-{secrets.token_hex(3)}",
        env={"HARNESS_NP": "2", "HARNESS_LAUNCHER": "gloo"},
        mounts=[f"{DIGITS}:/model_def:ro", f"{out}:/output"],
    )
    assert_trained_digits(proc, out)


def test_image_hostname_resolves(image):
    proc = run_in_image(image, "bash", "-c", 'getent hosts "$(hostname)"', hostname="not-in-etc-hosts")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sigterm_reaches_the_ranks(image, tmp_path):
    """`docker stop`: the entrypoint passes SIGTERM to the ranks; they checkpoint and the job exits 0."""
    model = digits_copy(tmp_path, epochs=500)
    out = output_dir(tmp_path)
    script = (
        f"{ENTRYPOINT} & pid=$!"
        "; until grep -q training /output/metrics.jsonl 2>/dev/null; do sleep 0.2; done"
        '; kill -TERM "$pid"; wait "$pid"; echo "entrypoint exit status $?"'
    )
    proc = run_in_image(
        image,
        "bash",
        "-c",
        script,
        env={"HARNESS_NP": "2", "HARNESS_LAUNCHER": "gloo"},
        mounts=[f"{model}:/model_def:ro", f"{out}:/output"],
        timeout=180,
    )
    assert "entrypoint: SIGTERM: passing it on to the job" in proc.stderr, proc.stderr[-3000:]
    assert "entrypoint exit status 0" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopped by SIGTERM at batch" in proc.stdout
    assert validation(out) == [] or validation(out)[-1]["batches"] < 11500  # stopped early


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def digits_copy(tmp_path, epochs):
    """samples/digits with another training length."""
    model = tmp_path / "model"
    shutil.copytree(DIGITS, model)
    config = (model / "experiment.yaml").read_text().replace("epochs: 8", f"epochs: {epochs}")
    (model / "experiment.yaml").write_text(config)
    return model


def test_two_hosts_over_ssh(image, tmp_path):
    """Multi-node as the README has it: workers run `entrypoint.sh sshd`, HARNESS_HOSTS names the hosts.

    One container plays both hosts: horovodrun takes 127.0.0.2 (loopback, but none of the interfaces'
    addresses) for another machine, and starts rank 1 there through ssh and sshd on a port of its own.
    """
    model = digits_copy(tmp_path, epochs=2)  # two ranks on 2 cores, each thinking it has them to itself
    out = output_dir(tmp_path)
    port = _free_port()
    script = f"""
        set -e
        mkdir -p ~/.ssh
        ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/id_rsa
        cp ~/.ssh/id_rsa.pub ~/.ssh/authorized_keys
        {ENTRYPOINT} sshd -p {port} 2> sshd.log & sshd=$!
        trap 'kill $sshd' EXIT
        sleep 1
        export HARNESS_HOSTS=localhost:1,127.0.0.2:1 HARNESS_SSH_PORT={port} HARNESS_LAUNCHER=gloo
        HOROVODRUN_ARGS="--network-interface lo" {ENTRYPOINT}
        grep -c "Accepted publickey for harness" sshd.log
    """
    proc = run_in_image(
        image, "bash", "-c", script, mounts=[f"{model}:/model_def:ro", f"{out}:/output"], timeout=300
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert validation(out)[-1]["epoch"] == pytest.approx(2.0)
    assert "2 ranks (gloo)" in proc.stdout
    assert int(proc.stdout.split()[-1]) >= 2  # horovodrun's ssh check, then rank 1's start
    hosts = f"-H localhost:1,127.0.0.2:1 --gloo --network-interface lo -p {port} "
    assert f"horovodrun -np 2 {hosts}" in proc.stderr
