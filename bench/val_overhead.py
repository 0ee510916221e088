"""What exact validation costs: the harness's weighted MetricAccumulator against a plain mean of batch means.

Runs the harness's own validation (``TrialAdapter.evaluate``) on one process (the single allreduce of the
metric sums is the same either way, so one process shows the whole difference), A/B interleaved:

- weighted: as shipped (each batch's metrics times its number of records, divided by the total records);
- plain:    ``batch_records`` replaced by ``1``, so each batch weighs 1 and the result is a mean of means.

And the weighting's own work timed alone (``batch_records`` and ``MetricAccumulator.add`` with a weight
against ``add`` without), per validation pass. Prints JSON.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads"))
import common  # noqa: E402

from harness import definition  # noqa: E402
from harness.distributed import Local  # noqa: E402
from harness.train import adapters as hadapters  # noqa: E402
from harness.train import metrics as hmetrics  # noqa: E402
from harness.train import sharding as hdata  # noqa: E402


def one_workload(workload: str, pairs: int) -> dict:
    model_def = definition.load(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads", workload)
    )
    trial = model_def.trial_class()
    _, val_loader = model_def.make_data_loaders({"data": {}}, {})
    loader = hdata.shard_validation_loader(val_loader, 0, 1)
    torch.manual_seed(common.SEED)
    model = common.build_model(workload)
    device, backend = torch.device("cpu"), Local()
    adapter = hadapters.make_adapter(trial)
    real = hadapters.batch_records

    def run(weighted: bool):
        hadapters.batch_records = real if weighted else (lambda inputs, labels, where: 1)
        try:
            t = time.perf_counter()
            out = adapter.evaluate(model, loader, device, backend)
            return time.perf_counter() - t, out
        finally:
            hadapters.batch_records = real

    for _ in range(3):  # warm-up
        run(True), run(False)
    weighted, plain, diffs = [], [], []
    for i in range(pairs):
        first = i % 2 == 0
        a = run(first)[0]
        b = run(not first)[0]
        w, p = (a, b) if first else (b, a)
        weighted.append(w)
        plain.append(p)
        diffs.append(w - p)
    exact, mean_of_means = run(True)[1], run(False)[1]
    if exact == mean_of_means:
        raise SystemExit("val_overhead: the plain variant computed the weighted result; the A/B is broken")

    # The weighting's own work, alone: per batch, batch_records + add(weight=n) vs add(weight=1).
    batches = []
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            batches.append((x, y, trial.validation_metrics(out, y, trial.losses(out, y))))
    n = 2000

    def time_adds(weighted: bool) -> float:
        acc = hmetrics.MetricAccumulator(device, "validation_metrics()")
        t = time.perf_counter()
        for _ in range(n):
            for x, y, m in batches:
                if weighted:
                    acc.add(m, weight=real(x, y, "validation batch"))
                else:
                    acc.add(m)
        return (time.perf_counter() - t) / n

    direct = statistics.median(time_adds(True) - time_adds(False) for _ in range(5))
    w_med, p_med = statistics.median(weighted), statistics.median(plain)
    return {
        "weighted_ms": w_med * 1e3,
        "plain_ms": p_med * 1e3,
        "overhead": statistics.median(diffs) / p_med,
        "direct_ms_per_pass": direct * 1e3,
        "direct_overhead": direct / p_med,
        "batches_per_pass": len(batches),
        "exact": exact,
        "mean_of_batch_means": mean_of_means,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--workloads", nargs="+", default=sorted(common.WORKLOADS))
    args = p.parse_args()
    torch.set_num_threads(common.threads_per_rank(1))
    result = {"pairs": args.pairs, "workloads": {w: one_workload(w, args.pairs) for w in args.workloads}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
