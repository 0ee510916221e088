"""The benchmark end to end on a tiny setting, so that it cannot rot (its numbers are not checked here)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.skipif(
    shutil.which("horovodrun", path=BIN) is None or shutil.which("torchrun", path=BIN) is None,
    reason="Horovod or torchrun is not installed (run `make setup`)",
)


def lightning_installed():
    return any(importlib.util.find_spec(m) is not None for m in ("lightning", "pytorch_lightning"))


def test_bench_quick_runs_every_contender(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "run.py"),
            "--quick",
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=170,
        env=dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"]),
    )
    took = time.monotonic() - start
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    results = json.loads((out / "results.json").read_text())
    expected = {"harness", "horovod", "ddp"} | ({"lightning"} if lightning_installed() else set())
    assert {r["contender"] for r in results["rows"]} == expected
    if not lightning_installed():
        assert any("Lightning is not installed" in n for n in results["notes"])
    for row in results["rows"]:
        assert row["np"] == 2 and row["torch_threads"] == max(1, (os.cpu_count() or 1) // 2), row
        assert row["samples_per_s"] > 0 and row["peak_rss_mib"] > 50, row
        assert 0 < row["validation_s"] < 30 and 0 < row["first_batch_s"] < 120, row
        assert 0 <= row["validation_metrics"]["accuracy"] <= 1, row
    # Every contender trained the same model on the same data: the same validation loss up to rounding
    # (the harness and the hand-written loop differ from DDP only in Horovod's optimizer-state broadcast).
    losses = {r["contender"]: r["validation_metrics"]["loss"] for r in results["rows"]}
    assert max(losses.values()) - min(losses.values()) < 0.05, losses
    names = {t["target"] for t in results["targets"]}
    assert any("hand-written Horovod" in n for n in names) and any("exact validation" in n for n in names)

    md = (out / "RESULTS.md").read_text()
    assert "| workload | np | contender |" in md and "## Targets" in md
    for label in ("harness (horovodrun)", "hand-written Horovod", "torchrun + DDP"):
        assert label in md
    print(f"bench --quick took {took:.0f} s")


def test_bench_help_lists_the_options():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--contenders" in proc.stdout and "--harness-src" in proc.stdout
