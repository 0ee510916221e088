"""scripts/check_torch.sh: the image build refuses a torch of the wrong flavor (CUDA in the CPU image)."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.dirname(os.path.dirname(sys.executable))


def check(flavor):
    script = os.path.join(ROOT, "scripts", "check_torch.sh")
    return subprocess.run(["bash", script, flavor, VENV], capture_output=True, text=True, timeout=60)


def test_the_flavor_of_this_torch_passes_and_the_other_fails():
    mine, other = ("gpu", "cpu") if torch.version.cuda else ("cpu", "gpu")
    ok = check(mine)
    assert ok.returncode == 0 and f"({mine}: CUDA" in ok.stdout, ok.stderr
    bad = check(other)
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith(f"[setup] ERROR: torch {torch.__version__} is a ")
    assert check("any").returncode == 0
