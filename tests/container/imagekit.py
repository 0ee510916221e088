"""Building the image as CI builds it, and running commands in fresh containers of it (both flavors' tests).

scripts/build_image.sh builds it: with `docker build` where a Docker engine answers, else with buildah
(installed with apt-get if missing) on a Debian 12 base made here with debootstrap. Set
HARNESS_SKIP_IMAGE_TESTS=1 to skip the tests that build it.
"""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "samples", "digits")
ENTRYPOINT = "/usr/local/bin/entrypoint.sh"
TORCH_VERSION = os.environ.get("TORCH_VERSION", "2.13.0")
VENV = "/opt/harness/venv"


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
needs_engine = pytest.mark.skipif(ENGINE is None, reason=WHY_NOT)


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


def build_env(flavor, image):
    env = dict(os.environ, FLAVOR=flavor, IMAGE=image)
    if ENGINE == "buildah" and not env.get("BASE_IMAGE"):
        env["DEBIAN_BASE"] = "1"  # no registry needed
    cert = _pip_setting("cert") or "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(cert):
        env["PIP_CERT"] = cert  # harmless without a TLS-intercepting proxy: the system's CAs
    links = _pip_setting("find-links")
    if links:
        env["PIP_FIND_LINKS"] = links
    if flavor == "cpu" and links and "TORCH_INDEX_URL" not in env:
        local_torch = [
            f
            for d in links.split()
            if os.path.isdir(d.removeprefix("file://"))
            for f in os.listdir(d.removeprefix("file://"))
            if f.startswith(f"torch-{TORCH_VERSION}+cpu-")
        ]
        if local_torch:
            env["TORCH_INDEX_URL"] = ""  # the local CPU wheel; no PyTorch index needed
    return env


def _containers():
    if ENGINE != "buildah" or shutil.which("buildah") is None:  # not installed yet: build_image.sh will
        return set()
    listing = subprocess.run(
        ["buildah", "containers", "--format", "{{.ContainerName}}"], capture_output=True, text=True
    ).stdout
    return {name for name in listing.split() if "working-container" in name}  # those of `buildah bud`


def build(flavor, image, log):
    """Build the image with scripts/build_image.sh (output in the file `log`); returns the seconds it took."""
    before = _containers()
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "build_image.sh")],
            env=build_env(flavor, image),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
    seconds = time.monotonic() - start
    text = open(log).read()
    assert proc.returncode == 0, f"image build failed (log {log}):\n{text[-6000:]}"
    assert _containers() <= before, "the build left buildah containers behind"
    if ENGINE == "buildah" and shutil.which("podman"):
        # Each change to scripts/ or pyproject.toml leaves a few GB of layers behind: on a machine that
        # builds again and again (CI), drop the unnamed ones that no build has used for three days.
        subprocess.run(["podman", "image", "prune", "-f", "--filter", "until=72h"], capture_output=True)
    return seconds


def _inspect(image, template):
    """`image inspect --format TEMPLATE` (podman beside buildah: build_image.sh installs both)."""
    tool = "docker" if ENGINE == "docker" else "podman"
    cmd = [tool, "image", "inspect", "--format", template, image]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def image_size(image):
    """The image's size in bytes, as the engine reports it."""
    return int(_inspect(image, "{{.Size}}"))


def image_config(image):
    """The image's config: User, Env, Labels, Entrypoint, ..."""
    return json.loads(_inspect(image, "{{json .Config}}"))


# buildah's chroot isolation copies its runtime into a sealed memfd before it runs anything; the seal fails
# now and then with EBUSY (seen once in a full `make test`, under load; the rerun passed). The command itself
# never ran, so running it again is safe.
BUILDAH_SETUP_FAILURE = "sealing memfd copy: Device or resource busy"


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
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 and BUILDAH_SETUP_FAILURE in proc.stderr:  # before the command ran: again
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return proc
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
