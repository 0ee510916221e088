"""The benchmark end to end on a tiny setting, so that it cannot rot (its numbers are not checked here)."""

import importlib.util
import json
import os
import shutil
import signal
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
        timeout=360,  # 7 runs: 5 contenders (Lightning if installed), agg4 for the harness and Horovod loop
        env=dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"]),
    )
    took = time.monotonic() - start
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    results = json.loads((out / "results.json").read_text())
    expected = {"harness", "horovod", "torch", "ddp"} | ({"lightning"} if lightning_installed() else set())
    baseline = [r for r in results["rows"] if r["variant"] == "fp32"]
    assert {r["contender"] for r in baseline} == expected
    # --quick also runs one training option (gradient aggregation, k=4) for the harness and the Horovod loop.
    agg = [r for r in results["rows"] if r["variant"] == "agg4"]
    assert {r["contender"] for r in agg} == {"harness", "horovod"}, results["rows"]
    assert {r["variant"] for r in results["rows"]} == {"fp32", "agg4"}
    for run in results["runs"]:  # the probe counted one optimizer step per 4 batches of 32: 8
        assert run["optimizer_steps"] * run["batches_per_step"] == 32, run
        assert run["batches_per_step"] == (4 if run["variant"] == "agg4" else 1), run
    if not lightning_installed():
        assert any("Lightning is not installed" in n for n in results["notes"])
    for row in results["rows"]:
        assert row["np"] == 2 and row["torch_threads"] == max(1, (os.cpu_count() or 1) // 2), row
        assert row["samples_per_s"] > 0 and row["peak_rss_mib"] > 50, row
        assert 0 < row["validation_s"] < 30 and 0 < row["first_batch_s"] < 120, row
        assert 0 <= row["validation_metrics"]["accuracy"] <= 1, row
    # Every contender trained the same model on the same data: the same validation loss up to rounding
    # (the harness and the hand-written loop differ from DDP only in Horovod's optimizer-state broadcast).
    for rows in (baseline, agg):  # and the harness aggregates as the hand-written loop does
        losses = {r["contender"]: r["validation_metrics"]["loss"] for r in rows}
        assert max(losses.values()) - min(losses.values()) < 0.05, losses
    for row in agg:
        assert row["throughput_vs_fp32"] > 0, row
    names = {t["target"] for t in results["targets"]}
    assert any("hand-written Horovod" in n for n in names) and any("exact validation" in n for n in names)
    assert any(n.startswith("mlp np=2 agg4: harness / hand-written Horovod") for n in names), names
    # The torch backend is compared with hand-written torchrun + DDP, and it ran on that backend: torchrun's
    # two ranks in one Gloo process group (as one process each, every rank would train on its own).
    assert any(n.startswith("mlp np=2: torch backend / torchrun + DDP") for n in names), names
    torch_row = next(r for r in baseline if r["contender"] == "torch")
    assert torch_row["throughput_vs_ddp"] > 0 and len(torch_row["throughput_vs_ddp_all"]) == 1, torch_row
    log = (work / "mlp-np2-fp32-torch-rep0" / "log.txt").read_text()
    assert "training on cpu with 2 ranks (gloo)" in log, log[-2000:]

    md = (out / "RESULTS.md").read_text()
    assert "| workload | np | contender |" in md and "## Targets" in md
    assert "## Training options" in md and "| mlp | 2 | agg4 |" in md
    for label in ("harness (horovodrun)", "hand-written Horovod", "torchrun + DDP", "harness, torch backend"):
        assert label in md
    assert "## The torch backend against torchrun + DDP" in md and "Load average" in md
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


def test_search_bench_quick(tmp_path):
    """bench/search.py on 2 tiny trials: every figure it reports is there and plausible."""
    out = tmp_path / "search.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "search.py"),
            "--trials",
            "2",
            "--batches",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"]),
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    results = json.loads(out.read_text())
    for parallel in ("parallel1", "parallel2"):
        row = results[parallel]
        assert 0 < row["launch_to_first_report_s"] < row["trial_wall_s"] <= row["wall_s"], row
        assert 0 <= row["bookkeeping_s"] < 10 and row["last_report_to_end_s"] >= 0, row
    assert results["plain_one_after_another_wall_s"] > 0
    assert "harness search --parallel 2:" in proc.stdout


def test_ab_np2_sliced_takes_turns_and_reports_each_contender(tmp_path):
    """ab_np2.py --slice: the jobs run at once, stopped and continued in turns; each finishes and is read, a
    --contender copy of the harness is the harness that its job imports, and the harness trains what the DDP
    loop trains."""
    copy, mark = tmp_path / "copy", tmp_path / "copy-ran"
    shutil.copytree(
        os.path.join(ROOT, "harness"), copy / "harness", ignore=shutil.ignore_patterns("__pycache__")
    )
    main = copy / "harness" / "__main__.py"
    main.write_text(f"open({str(mark)!r}, 'a').write('ran\\n')\n" + main.read_text())
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "ab_np2.py"), "--batches", "600", "--reps", "1"]
        + ["--slice", "0.5", "--contender", f"copy={copy}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], TMPDIR=str(tmp_path)),
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert mark.read_text() == "ran\n" * 2  # both ranks of the copy's job, and no other job
    for name in ("ddp", "torch", "copy"):
        line = next(x for x in proc.stdout.splitlines() if x.startswith(f"{name} ") and "median over" in x)
        p5, p50 = (float(line.split(f" {q} ")[1].split()[0]) for q in ("p5", "p50"))
        assert 0 < p5 <= p50 < 50, line  # a step spanning a pause (over 50 ms) is left out
    # The harness trains the same numbers as ddp_loop.py (given its seed), so that their step times compare
    # the same work (another seed changes, e.g., how many denormal floats Adam's state holds).
    work = next(tmp_path.glob("ab-np2-*"))
    with open(work / "ddp-0" / "probe" / "rank0.json") as f:
        ddp = json.load(f)["validation"]["loss"]
    with open(work / "torch-0" / "output" / "metrics.jsonl") as f:
        last = [e for e in map(json.loads, f) if e["type"] == "validation"][-1]
    assert last["metrics"]["loss"] == pytest.approx(ddp, rel=1e-5)
    # No job is left behind, stopped or running (the harness jobs name the work directory in their
    # arguments).
    left = subprocess.run(["pgrep", "-a", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == [], left


def test_ab_np2_sigterm_ends_its_stopped_jobs(tmp_path):
    """SIGTERM to ab_np2.py while its sliced jobs take turns (all but one stopped): it ends every one of
    them, and none is left behind stopped."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "bench", "ab_np2.py"), "--batches", "100000", "--reps", "1"]
        + ["--slice", "0.5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], TMPDIR=str(tmp_path)),
    )

    def jobs():  # every job's processes have the work directory in their environment (BENCH_OUT)
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if str(tmp_path).encode() in f.read() and int(pid) != proc.pid:
                        found.append(pid)
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 120
    while len(jobs()) < 6 and time.monotonic() < deadline:  # two torchruns and their ranks
        time.sleep(0.5)
    assert len(jobs()) >= 6, "the jobs did not start"
    time.sleep(2)  # a few turns: some jobs are stopped now
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    deadline = time.monotonic() + 10
    while jobs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jobs() == []


def test_loop_sections_times_every_part_of_both_loops(tmp_path):
    """loop_sections.py finds each anchor in the loop and in ddp_loop.py (a changed line fails it here, by
    name), and every part of a batch gets a time: the harness's own parts only in its column."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "loop_sections.py")]
        + ["--batches", "600", "--runs", "1", "--skip", "100"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], TMPDIR=str(tmp_path)),
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    rows = {line[:36].strip(): line[36:].split() for line in proc.stdout.splitlines()[2:] if line[:1] != "("}
    harness_only = {"stop vote's start, watchdog beat", "adapter.prepare", "duties when due"}
    for part, cells in rows.items():
        if part == "whole batch":
            ddp, harness = (float(c) for c in cells)
            assert ddp > 0 and harness > 0
            continue
        text = " ".join(cells)
        if part in harness_only:
            assert text.startswith("— "), (part, text)
        mean, median = (float(x) for x in text.split()[-3::2])  # the harness's "mean / median"
        assert mean > 0 and median > 0, (part, text)
    assert len(rows) == 9, rows
    # The repository is not changed: the marks go into copies.
    assert "_sections" not in open(os.path.join(ROOT, "harness", "train", "loop.py")).read()
