"""What the training loop costs per batch: ``harness.train.loop.train`` against the plain loop, in one
process.

Both run in the same process (same imports, threads and allocator), A/B interleaved, on a bench workload:

- harness: ``harness.train.loop.train`` with the one-process backend, as ``harness ./model_def`` runs it,
  reporting every ``--report-every`` batches (metrics.jsonl, TensorBoard, a console line) and validating at
  the end;
- plain:   the hand-written loop's body (DistributedSampler, zero_grad/forward/backward/step, ``loss.item()``
  every ``--report-every`` batches), without Horovod, which one process does not need.

The probe of ``workloads/common.py`` stamps every optimizer step in both. Prints, per variant, the median of
the per-pair median step times (the steady per-batch cost) and of the mean step times (which also carries the
reports and epoch starts), and the harness / plain ratios. No launcher, no Horovod: use it to find per-batch
Python overhead; ``bench/run.py`` measures the real thing. ``--trial-api train_batch`` runs the harness with
the same trial written in PEDL's later API; ``both`` runs the two APIs and the plain loop interleaved and
adds their ratio (``train_batch_vs_losses_*``); ``context`` runs Determined's context API against the
``train_batch`` API (``context_vs_train_batch_*``).

``--backend torch`` runs the harness on its torch backend (``TorchDistributed``: DDP's reducer on the trial's
module, stop votes on its Gloo group) against the plain loop on ``DistributedDataParallel``, both in a
one-rank Gloo process group: the per-batch cost the torch backend adds to hand-written DDP, without a second
rank's scheduling noise (a one-rank group still runs DDP's bucketing and its allreduces). Under torchrun
(``torchrun --standalone --nproc_per_node 2 bench/loop_overhead.py --backend torch``) the same pairs run at
that many ranks, in the same processes: what differs between the two is then the loop's own work per batch,
not the process around it (threads, process groups, imports); rank 0 prints.

    .venv/bin/python bench/loop_overhead.py --workload mlp --batches 4000 --pairs 7
    .venv/bin/python bench/loop_overhead.py --workload mlp --trial-api both
    .venv/bin/python bench/loop_overhead.py --workload mlp --trial-api context
    .venv/bin/python bench/loop_overhead.py --workload mlp --backend torch
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile

os.environ.setdefault("BENCH_OUT", tempfile.mkdtemp(prefix="loop-overhead-"))  # arms the probe's hooks
os.environ["BENCH_WARMUP"] = os.environ.get("BENCH_WARMUP", "300")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "workloads"))
import bench_trial  # noqa: E402
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import config as config_mod  # noqa: E402
from harness import definition, distributed  # noqa: E402
from harness.train import loop  # noqa: E402

PROBE = common.PROBE


def _reset_probe() -> None:
    PROBE.armed, PROBE.steps, PROBE.step_ends = False, 0, []
    PROBE.warm_t = PROBE.last_t = None


def _step_times() -> tuple:
    """(median, mean) step time in seconds after the warm-up."""
    ends = PROBE.step_ends[PROBE.warmup - 1 :]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    return statistics.median(steps), (ends[-1] - ends[0]) / len(steps)


def harness_run(model_def, config_path: str, output: str, backend=None) -> tuple:
    _reset_probe()
    cfg = config_mod.load_config(config_path)
    if backend is not None:
        backend._ddp = {}  # this run's model gets its own reducer (a dead model's id may be reused)
    with contextlib.redirect_stdout(io.StringIO()):
        loop.train(model_def, cfg, output, backend or distributed.Local(), fresh=True)
    return _step_times()


def plain_run(workload: str, batches: int, report_every: int, ddp: bool = False, rank=0, size=1) -> tuple:
    _reset_probe()
    torch.manual_seed(common.SEED)
    train_set, _ = common.datasets()
    sampler = torch.utils.data.DistributedSampler(
        train_set, num_replicas=size, rank=rank, shuffle=True, seed=common.SEED
    )
    w = common.WORKLOADS[workload]
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=w.global_batch // size, sampler=sampler, drop_last=True
    )
    model = common.build_model(workload)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = common.build_optimizer(workload, model)
    model.train()
    step, epoch = 0, 0
    while step < batches:
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            if step % report_every == 0:
                print(f"batch {step} loss {loss.item():.4f}", file=io.StringIO())
            if step >= batches:
                break
        epoch += 1
    return _step_times()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(common.WORKLOADS), default="mlp")
    p.add_argument("--batches", type=int, default=4000)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--report-every", type=int, default=100)
    p.add_argument("--trial-api", choices=("losses", "train_batch", "both", "context"), default="losses")
    p.add_argument(
        "--backend",
        choices=("local", "torch"),
        default="local",
        help="torch: the harness's torch backend against a plain DDP loop, in a one-rank Gloo group",
    )
    args = p.parse_args()
    if args.batches <= PROBE.warmup + 1:
        p.error(f"--batches must exceed the warm-up of {PROBE.warmup}")
    backend = None
    if args.backend == "torch":  # TorchDistributed makes the group (and its own Gloo group)
        if not distributed.torchrun_environment():  # a one-rank group of this process
            port = str(_free_port())
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        backend = distributed.TorchDistributed()
    rank, size = (backend.rank, backend.size) if backend else (0, 1)
    torch.set_num_threads(common.threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    work = tempfile.mkdtemp(prefix="loop-overhead-") if rank == 0 else None
    if backend is not None:  # the ranks share one output directory, as under a launcher
        work = backend.broadcast_object(work)
    config_path = os.path.join(work, "experiment.yaml")
    with open(config_path, "w") as f:
        f.write(common.harness_config(args.batches, args.report_every))
    model_def = definition.load(os.path.join(HERE, "workloads", args.workload))
    batch_api_def = dataclasses.replace(
        model_def, trial_class=bench_trial.batch_api_trial_class(args.workload)
    )
    variants = {
        "losses": {"harness": model_def},
        "train_batch": {"harness": batch_api_def},
        "both": {"harness": model_def, "harness_train_batch": batch_api_def},
        # Determined's context API against PEDL's train_batch API (and the plain loop)
        "context": {
            "harness": batch_api_def,
            "harness_context": dataclasses.replace(
                model_def,
                trial_class=bench_trial.context_api_trial_class(args.workload),
                make_data_loaders=None,
                download_data=None,
            ),
        },
    }[args.trial_api]
    output = os.path.join(work, "output")
    runs = {name: [] for name in [*variants, "plain"]}
    for i in range(args.pairs):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            if name == "plain":
                runs[name].append(
                    plain_run(args.workload, args.batches, args.report_every, backend is not None, rank, size)
                )
            else:
                runs[name].append(harness_run(variants[name], config_path, output, backend))
    PROBE.out = None  # nothing to write at exit
    result = {
        "workload": args.workload,
        "batches": args.batches,
        "pairs": args.pairs,
        "trial_api": args.trial_api,
        "backend": args.backend,
        "ranks": size,
    }
    for name, values in runs.items():
        result[f"{name}_median_step_us"] = statistics.median(v[0] for v in values) * 1e6
        result[f"{name}_mean_step_us"] = statistics.median(v[1] for v in values) * 1e6
    pairs = list(zip(runs["harness"], runs["plain"]))
    result["median_step_ratio"] = statistics.median(h[0] / q[0] for h, q in pairs)
    result["mean_step_ratio"] = statistics.median(h[1] / q[1] for h, q in pairs)
    if "harness_train_batch" in runs:  # PEDL's later API against the first, paired within a repetition
        both = list(zip(runs["harness_train_batch"], runs["harness"]))
        result["train_batch_vs_losses_median_step"] = statistics.median(t[0] / s[0] for t, s in both)
        result["train_batch_vs_losses_mean_step"] = statistics.median(t[1] / s[1] for t, s in both)
    if "harness_context" in runs:  # Determined's context API against train_batch, paired
        both = list(zip(runs["harness_context"], runs["harness"]))
        result["context_vs_train_batch_median_step"] = statistics.median(t[0] / s[0] for t, s in both)
        result["context_vs_train_batch_mean_step"] = statistics.median(t[1] / s[1] for t, s in both)
    if rank == 0:
        print(json.dumps(result, indent=1))
    if backend is not None:
        backend.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
