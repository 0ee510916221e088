"""tests/gpu/amp_bench.py end to end in its CPU mode, so that the GPU benchmark cannot rot between GPU runs.

On the CPU it runs fp32 (``mixed_precision: O0``) and bf16 (the harness refuses fp16 there) for the harness
and the hand-written loop (one process each), and for the harness's torch backend and the loop on DDP (both
under torchrun, 2 ranks, Gloo), on tiny sizes. Its speed numbers are not checked here (CPU, shared
machine); what is checked: every row is there, each contender trained in the precision asked for, and the
two of a pair trained the same thing (the same losses: same network, initialisation, data and batch order).
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AMP_BENCH = os.path.join(ROOT, "tests", "gpu", "amp_bench.py")


def run_bench(*args, timeout=480):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, AMP_BENCH, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_amp_bench_cpu_mode_runs_every_contender_in_fp32_and_bf16(tmp_path):
    proc = run_bench("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    result = json.loads((tmp_path / "amp_bench.json").read_text())
    assert result["problems"] == [] and result["targets"] == []  # the fp16 target is for CUDA only

    rows = {(r["precision"], r["contender"]): r for r in result["rows"]}
    contenders = ("harness", "hand-written", "harness-torch", "hand-written-ddp")
    assert set(rows) == {(p, c) for p in ("fp32", "bf16") for c in contenders}
    settings = result["settings"]
    for (precision, _), row in rows.items():
        assert "error" not in row, row
        assert row["device"] == "cpu" and row["samples_per_s"] > 0, row
        assert row["ranks"] == (2 if row["contender"] in ("harness-torch", "hand-written-ddp") else 1), row
        assert row["timed_batches"] == settings["batches"] - settings["warmup"] - 1, row
        want = {"fp32": (None, "float32"), "bf16": ("bfloat16", "bfloat16")}[precision]
        assert (row["autocast_dtype"], row["output_dtype"]) == want, row
        assert row["peak_train_allocated_mib"] is None and row["max_rss_mib"] > 50, row
        assert len(row["losses"]) == math.ceil(settings["batches"] / settings["report_every"]), row
        assert row["losses"][-1] < row["losses"][0], row
        assert 0 <= row["validation"]["accuracy"] <= 1, row

    summary = {(s["precision"], s["contender"]): s for s in result["summary"]}
    assert set(summary) == set(rows)
    for (_, contender), s in summary.items():
        assert s["samples_per_s"] > 0 and s["vs_hand_written"] > 0, s
        assert s["vs"] == {"harness": "hand-written", "harness-torch": "hand-written-ddp"}.get(
            contender, contender
        )
        if contender.startswith("hand-written"):
            assert s["vs_hand_written"] == 1.0
        # Same model, data and order in both of a pair: the same loss curve (to float rounding) on the CPU;
        # for the torch pair also the same sharding, and gradients averaged by DDP in both.
        assert s["loss_gap_vs_hand_written"] < 1e-4, s

    md = (tmp_path / "amp_bench.md").read_text()
    assert "| precision | contender | samples/s | vs hand-written |" in md and "Machine:" in md
    assert "| bf16 | harness |" in md and "| fp32 | hand-written |" in md
    assert "| bf16 | harness-torch |" in md and "| fp32 | hand-written-ddp |" in md
    assert "`torchrun --nproc_per_node 2`" in md and "Gloo between the ranks" in md
    # The harness's torch-backend runs trained on 2 ranks (one process group), not as 2 lone processes.
    for precision in ("fp32", "bf16"):
        log = (tmp_path / "runs" / f"{precision}-harness-torch-0" / "log.txt").read_text()
        assert "training on cpu with 2 ranks (gloo)" in log, log[-2000:]
    # The harness's own record of the runs: the fp32 run was configured with O0, the bf16 one with bf16.
    for precision, spelling in (("fp32", "O0"), ("bf16", "bf16")):
        config = (tmp_path / f"config-{precision}.yaml").read_text()
        assert f"mixed_precision: {spelling}" in config


def test_amp_bench_cpu_mode_refuses_fp16(tmp_path):
    proc = run_bench("--device", "cpu", "--precisions", "fp16", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "fp16 needs CUDA" in proc.stderr
