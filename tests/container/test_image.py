"""The CPU image, built as CI builds it, training samples/digits inside through entrypoint.sh.

scripts/build_image.sh builds it: with `docker build` where a Docker engine answers, else with buildah
(installed with apt-get if missing) on a Debian 12 base made here with debootstrap. Each test runs commands
in a fresh container of the image (`buildah run`, or `docker run`) with /model_def and /output bound.
Set HARNESS_SKIP_IMAGE_TESTS=1 to skip them.
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "samples", "digits")
IMAGE = os.environ.get("HARNESS_TEST_IMAGE", "localhost/harness:cpu-test")
ENTRYPOINT = "/usr/local/bin/entrypoint.sh"
TORCH_VERSION = os.environ.get("TORCH_VERSION", "2.13.0")


def _engine():
    """(docker | buildah | None, why not)."""
    if os.environ.get("HARNESS_SKIP_IMAGE_TESTS") == "1":
        return None, "HARNESS_SKIP_IMAGE_TESTS=1"
    if shutil.which("docker"):
        if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
            return "docker", ""
    if sys.platform != "linux":
        return None, "no Docker engine, and buildah needs Linux"
    if shutil.which("buildah") or (shutil.which("apt-get") and os.geteuid() == 0):
        return "buildah", ""
    return None, "no Docker engine, no buildah, and no root to install it with apt-get"


ENGINE, WHY_NOT = _engine()
pytestmark = pytest.mark.skipif(ENGINE is None, reason=WHY_NOT)


def _pip_setting(name):
    """This machine's pip setting (environment, then pip's config files), to build the image the same way."""
    value = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if value:
        return value
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    m = re.search(rf"^global\.{name}='([^']*)'$", listing, re.MULTILINE)
    return m.group(1) if m else None


def _build_env():
    env = dict(os.environ, FLAVOR="cpu", IMAGE=IMAGE)
    if ENGINE == "buildah" and not env.get("BASE_IMAGE"):
        env["DEBIAN_BASE"] = "1"  # no registry needed
    cert = _pip_setting("cert") or "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(cert):
        env["PIP_CERT"] = cert  # harmless without a TLS-intercepting proxy: the system's CAs
    links = _pip_setting("find-links")
    if links:
        env["PIP_FIND_LINKS"] = links
        local_torch = [
            f
            for d in links.split()
            if os.path.isdir(d.removeprefix("file://"))
            for f in os.listdir(d.removeprefix("file://"))
            if f.startswith(f"torch-{TORCH_VERSION}+cpu-")
        ]
        if local_torch and "TORCH_INDEX_URL" not in env:
            env["TORCH_INDEX_URL"] = ""  # the local CPU wheel; no PyTorch index needed
    return env


def _containers():
    if ENGINE != "buildah" or shutil.which("buildah") is None:  # not installed yet: build_image.sh will
        return set()
    listing = subprocess.run(
        ["buildah", "containers", "--format", "{{.ContainerName}}"], capture_output=True, text=True
    ).stdout
    return {name for name in listing.split() if "working-container" in name}  # those of `buildah bud`


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    log = tmp_path_factory.mktemp("image") / "build.log"
    before = _containers()
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "build_image.sh")],
            env=_build_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
    text = log.read_text()
    assert proc.returncode == 0, f"image build failed (log {log}):\n{text[-6000:]}"
    print(f"\nimage {IMAGE} built with {ENGINE} in {time.monotonic() - start:.0f} s")
    assert _containers() <= before, "the build left buildah containers behind"
    if ENGINE == "buildah" and shutil.which("podman"):
        # Each change to scripts/ or pyproject.toml leaves a few GB of layers behind: on a machine that
        # builds again and again (CI), drop the unnamed ones that no build has used for three days.
        subprocess.run(["podman", "image", "prune", "-f", "--filter", "until=72h"], capture_output=True)
    return IMAGE


def run_in_image(image, *command, env=None, mounts=(), user=None, hostname=None, timeout=300):
    """Run a command in a fresh container of the image; returns the CompletedProcess (stdout+stderr)."""
    env = env or {}
    if ENGINE == "docker":
        cmd = ["docker", "run", "--rm", "--shm-size=1g", "--entrypoint", command[0]]
        cmd += [f"--user={user}"] if user else []
        cmd += [f"--hostname={hostname}"] if hostname else []
        cmd += [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        cmd += [a for m in mounts for a in ("-v", m)]
        cmd += [image, *command[1:]]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    name = f"harness-test-{secrets.token_hex(4)}"
    subprocess.run(["buildah", "from", "--name", name, image], check=True, capture_output=True)
    try:
        # buildah 1.28 mishandles binds onto two of the image's VOLUMEs at once: drop them in this container.
        subprocess.run(
            ["buildah", "config", "--volume", "/model_def-", "--volume", "/output-", name], check=True
        )
        cmd = ["buildah", "run", "--isolation", "chroot"]
        cmd += ["--user", user] if user else []
        cmd += ["--hostname", hostname] if hostname else []
        cmd += [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
        cmd += [a for m in mounts for a in ("-v", m)]
        cmd += [name, "--", *command]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True)


def output_dir(tmp_path, name="out"):
    """An output folder the image's training user (uid 1000) can write to."""
    path = tmp_path / name
    path.mkdir()
    path.chmod(0o777)
    return path


def validation(output):
    with open(output / "metrics.jsonl") as f:
        return [e for e in map(json.loads, f) if e["type"] == "validation"]


def assert_trained_digits(proc, output):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    last = validation(output)[-1]
    assert last["batches"] == 184 and last["epoch"] == pytest.approx(8.0)
    assert last["metrics"]["accuracy"] >= 0.95
    assert (output / "config.yaml").is_file()
    assert os.stat(output / "metrics.jsonl").st_uid != 0  # written by the training user


def test_runs_as_a_non_root_user(image):
    proc = run_in_image(image, "id", "-u")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1000"
    if ENGINE == "buildah":
        user = subprocess.run(
            ["buildah", "inspect", "--type", "image", "--format", "{{.Docker.Config.User}}", image],
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert user == "1000"  # numeric: Kubernetes' runAsNonRoot can check it


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
