"""The cost of `harness search` outside training, and what --parallel buys on this machine.

    .venv/bin/python bench/search.py            # 8 short trials of samples/digits (about 2 minutes)
    .venv/bin/python bench/search.py --trials 2 --batches 6   # a quick run (tests/bench)

Three ways to train the same N trials (a grid over N learning rates, one rank each), one after another:
1. plain `harness` runs of each trial's config, one after another (no search at all);
2. `harness search --parallel 1`;
3. `harness search --parallel 2`.
Per trial it reports, from the study's timing and each trial's metrics.jsonl: launch to the first report
(start-up plus one batch, scheduling_unit 1), the last report to the trial's end (checkpoint, exit), and the
study's bookkeeping (lock, ask, sampling). Medians; wall times for the whole search.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(os.path.abspath(sys.executable))
SAMPLE = os.path.join(ROOT, "samples", "digits")


def search_config(trials: int, batches: int) -> Dict[str, Any]:
    with open(os.path.join(SAMPLE, "experiment.yaml")) as f:
        config = yaml.safe_load(f)
    rates = [round(0.0005 * 1.6**i, 6) for i in range(trials)]
    config["hyperparameters"]["learning_rate"] = {"type": "categorical", "vals": rates}
    config["searcher"] = {
        "name": "grid",
        "metric": "accuracy",
        "smaller_is_better": False,
        "max_length": {"batches": batches},
    }
    config["min_validation_period"] = {"batches": batches}
    config["scheduling_unit"] = 1
    return config


def run(argv: List[str]) -> float:
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"])
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(
            f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return time.monotonic() - start


def per_trial(out: str) -> Dict[str, float]:
    """Medians over the trials of a search's output."""
    sys.path.insert(0, ROOT)
    from harness.output.reports import read_reports as read_metrics
    from harness.search import results as search_results
    from harness.search import study as search_study

    info = search_results._info(out)
    study = search_study.load(info["storage"], info["study"])
    first, last, claim, walls = [], [], [], []
    for t in study.get_trials(deepcopy=False):
        timing = t.user_attrs[search_study.TIMING]
        entries = read_metrics(os.path.join(out, "trials", str(t.number), "metrics.jsonl"))
        first.append(entries[0]["time"] - timing["launched"])
        last.append(timing["ended"] - entries[-1]["time"])
        claim.append(timing["claim_s"])
        walls.append(timing["ended"] - timing["launched"])
    return {
        "launch_to_first_report_s": statistics.median(first),
        "last_report_to_end_s": statistics.median(last),
        "bookkeeping_s": statistics.median(claim),
        "trial_wall_s": statistics.median(walls),
        "trials_wall_sum_s": sum(walls),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-search-")
    try:
        config = os.path.join(work, "search.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(search_config(args.trials, args.batches), f)
        results: Dict[str, Any] = {"trials": args.trials, "batches": args.batches, "cores": os.cpu_count()}
        for parallel in (1, 2):
            out = os.path.join(work, f"parallel{parallel}")
            wall = run([f"{BIN}/harness", "search", SAMPLE, "--config", config, "--output", out,
                        "--parallel", str(parallel)])  # fmt: skip
            results[f"parallel{parallel}"] = dict(per_trial(out), wall_s=wall)
        plain = 0.0
        for number in range(args.trials):  # the same trials, without a search
            trial_config = os.path.join(work, "parallel1", "trials", str(number), "trial-config.yaml")
            plain += run([f"{BIN}/harness", SAMPLE, "--config", trial_config, "--output",
                          os.path.join(work, "plain", str(number)), "--quiet"])  # fmt: skip
        results["plain_one_after_another_wall_s"] = plain
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, two = results["parallel1"], results["parallel2"]
    print(f"{args.trials} trials of samples/digits, {args.batches} batches each, one rank each, "
          f"{results['cores']} cores")  # fmt: skip
    print(f"  plain harness runs, one after another: {plain:7.1f} s")
    print(f"  harness search --parallel 1:           {one['wall_s']:7.1f} s")
    speedup = one["wall_s"] / two["wall_s"]
    print(f"  harness search --parallel 2:           {two['wall_s']:7.1f} s  ({speedup:.2f}x)")
    print("  per trial (medians, --parallel 1 / 2):")
    for key, label in [
        ("launch_to_first_report_s", "launch to first report (start-up + 1 batch)"),
        ("last_report_to_end_s", "last report to the trial's end"),
        ("bookkeeping_s", "the study's bookkeeping (lock, ask, sample)"),
        ("trial_wall_s", "a trial's whole wall time"),
    ]:
        print(f"    {label:46s} {one[key]:6.2f} s / {two[key]:6.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
