"""The Dockerfile and the shell scripts around it, checked without building anything."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HADOLINT = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
SCRIPTS = ["entrypoint.sh", "scripts/build_image.sh", "scripts/setup.sh", "scripts/build_horovod.sh"]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (the `test` extra: make setup)")
def test_hadolint_passes():
    proc = subprocess.run([HADOLINT, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse_and_are_strict(script):
    path = os.path.join(ROOT, script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    with open(path) as f:
        text = f.read()
    assert "set -euo pipefail" in text
    assert os.access(path, os.X_OK)


def test_flavors_differ_only_in_their_base_images():
    """The GPU flavor cannot be built here: keep what is specific to it to a few lines."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        lines = [line for line in f if not line.startswith("#")]
    gpu_lines = [line.strip() for line in lines if re.search(r"gpu|cuda|nccl", line, re.IGNORECASE)]
    assert len(gpu_lines) <= 9, "\n".join(gpu_lines)
