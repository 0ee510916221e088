"""The Dockerfile and the shell scripts around it, checked without building anything."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HADOLINT = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
SCRIPTS = [
    "entrypoint.sh",
    "scripts/build_image.sh",
    "scripts/setup.sh",
    "scripts/build_horovod.sh",
    "scripts/cuda_toolchain.sh",
    "scripts/check_torch.sh",
]


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


def test_flavors_share_one_base_image():
    """Both flavors, both stages: FROM the same BASE_IMAGE (the GPU flavor's CUDA comes from PyPI)."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        lines = [line for line in f if not line.startswith("#")]
    bases = {line.split()[1] for line in lines if line.startswith("FROM ")}
    assert bases <= {"${BASE_IMAGE}", "runtime-${FLAVOR}", "builder"}, bases
    gpu_lines = [line.strip() for line in lines if re.search(r"gpu|cuda|nccl|nvidia", line, re.IGNORECASE)]
    assert len(gpu_lines) <= 6, "\n".join(gpu_lines)
