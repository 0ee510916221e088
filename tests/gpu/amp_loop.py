"""The hand-written Horovod + torch.amp loop that tests/gpu/amp_bench.py measures the harness against, and
the same loop on torchrun + DistributedDataParallel that it measures the harness's torch backend against.

It trains what the harness trains (tests/gpu/amp_model: the same network, data, optimizer, loader settings,
seed and batch order) from the same experiment config, with the canonical Horovod AMP step:

    scaler.scale(loss).backward(); optimizer.synchronize(); scaler.unscale_(optimizer)
    with optimizer.skip_synchronize(): scaler.step(optimizer)
    scaler.update()

Horovod is used when a launcher started the process as one of several ranks (``horovodrun -np N``): then
hvd.init(), a DistributedSampler per rank, hvd.DistributedOptimizer and a broadcast of rank 0's weights.
Under torchrun with several ranks (``torchrun --nproc_per_node N``) it is DDP instead, the canonical AMP
step on it (``scaler.scale(loss).backward()``, whose backward pass DDP's reducer allreduces, then
``scaler.step``, ``scaler.update()``): NCCL on CUDA, Gloo on the CPU, one GPU per rank, and each rank's own
BatchNorm statistics (``broadcast_buffers=False``), as the harness's torch backend keeps them.
Started as one plain process (how amp_bench.py runs it: one GPU), it initialises no Horovod and wraps
nothing, exactly as the harness does with one rank (its Local backend): at one rank Horovod's allreduce would
only wait for its background thread's next cycle, so both contenders leave it out and the comparison
measures the training loops, not Horovod.

    python tests/gpu/amp_loop.py --config CONFIG.yaml          # one process (GPU if there is one)
    horovodrun -np 2 -H localhost:2 python tests/gpu/amp_loop.py --config CONFIG.yaml
    torchrun --standalone --nproc_per_node 2 tests/gpu/amp_loop.py --config CONFIG.yaml   # DDP

Precision comes from the config's ``optimizations.mixed_precision`` (O0 or none: fp32; O1/O2/fp16: fp16
autocast with a GradScaler; bf16: bf16 autocast, no scaler), so both contenders read one file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "amp_model"))
import amp_common  # noqa: E402

LAUNCHER_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PRECISIONS = {None: "fp32", "O0": "fp32", "O1": "fp16", "O2": "fp16", "fp16": "fp16", "bf16": "bf16"}


def precision_of(config: Dict[str, Any]) -> str:
    mp = (config.get("optimizations") or {}).get("mixed_precision")
    if mp not in PRECISIONS:
        raise SystemExit(f"amp_loop: mixed_precision {mp!r} is not one of {sorted(map(str, PRECISIONS))}")
    return PRECISIONS[mp]


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the experiment config (the one the harness gets)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = p.parse_args(argv)
    with open(args.config) as f:
        config = yaml.safe_load(f)
    hp, data = config["hyperparameters"], config["data"]
    seed = int(config["reproducibility"]["experiment_seed"])
    total = int(config["searcher"]["max_length"]["batches"])
    report_every = int(config.get("scheduling_unit", 100))
    precision = precision_of(config)

    hvd: Any = None
    ddp = False  # torchrun's ranks: torch.distributed and DDP
    rank, size, local_rank, local_size = 0, 1, 0, 1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if any(v in os.environ for v in LAUNCHER_VARS):
        import horovod.torch as hvd

        hvd.init()
        rank, size, local_rank, local_size = hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()
        if size == 1:
            hvd = None  # one rank: nothing to allreduce (the harness does the same)
    elif all(v in os.environ for v in TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1:
        # (one rank under torchrun: no process group, nothing to allreduce; the harness's torch backend too)
        ddp = True
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    # The machine's cores split among the ranks, unless OMP_NUM_THREADS says (as the harness does).
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    train_set, val_set = amp_common.datasets(data)
    kw = amp_common.loader_kwargs(data, device.type)
    sampler = DistributedSampler(train_set, num_replicas=size, rank=rank, shuffle=True, seed=seed)
    per_rank = int(hp["global_batch_size"]) // size
    train_loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True, **kw)
    val_shard = Subset(val_set, range(rank, len(val_set), size))
    val_loader = DataLoader(val_shard, batch_size=int(data.get("validation_batch", 512)), **kw)

    model: Any = amp_common.build_model(hp).to(device)
    optimizer = amp_common.build_optimizer(model, hp)
    if ddp:  # broadcasts rank 0's weights; the reducer allreduces the gradients in the backward pass
        model = DistributedDataParallel(
            model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False
        )
    if hvd is not None:
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    torch.manual_seed(seed + rank)

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    # Steps the GradScaler skipped (inf/NaN gradients) are counted without a device sync: it does not call
    # optimizer.step() then, so the step hooks do not fire (a depth count: Horovod's step calls the wrapped
    # optimizer's, and both run the hooks). The loss scale is read only at reports, as the loss is.
    steps = {"depth": 0, "taken": 0}

    def before_step(*_: Any) -> None:
        steps["depth"] += 1

    def after_step(*_: Any) -> None:
        steps["depth"] -= 1
        steps["taken"] += steps["depth"] == 0

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)
    if rank == 0:
        print(f"amp_loop: {precision} on {device}, {size} rank(s), {total} batches", flush=True)

    model.train()
    batches, epoch = 0, 0
    loss_sum = torch.zeros((), device=device)
    while batches < total:
        sampler.set_epoch(epoch)
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=use_cuda), y.to(device, non_blocking=use_cuda)
            with autocast():
                loss = F.cross_entropy(model(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                if hvd is not None:
                    optimizer.synchronize()
                scaler.unscale_(optimizer)
                with optimizer.skip_synchronize() if hvd is not None else contextlib.nullcontext():
                    scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad()
            loss_sum += loss.detach().float()
            batches += 1
            if batches % report_every == 0 or batches == total:
                period = report_every if batches % report_every == 0 else batches % report_every
                mean = loss_sum / period
                if hvd is not None:
                    mean = hvd.allreduce(mean.cpu(), op=hvd.Average, name="loss")
                elif ddp:
                    dist.all_reduce(mean)
                    mean = mean / size
                report = {"batches": batches, "loss": mean.item()}
                if scaler is not None:
                    report.update(loss_scale=scaler.get_scale(), skipped_steps=period - steps["taken"])
                steps["taken"] = 0
                amp_common.PROBE.extra.setdefault("reports", []).append(report)
                loss_sum.zero_()
                if rank == 0:
                    shown = "  ".join(f"{k} {v:.5g}" for k, v in report.items() if k != "batches")
                    print(f"[training] batch {batches:6d}  {shown}", flush=True)
            if batches >= total:
                break
        epoch += 1

    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad(), autocast():
        for x, y in val_loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            sums[0] += F.cross_entropy(out.float(), y, reduction="sum")
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
    if hvd is not None:
        sums = hvd.allreduce(sums.cpu(), op=hvd.Sum, name="validation")
    elif ddp:
        dist.all_reduce(sums)
    metrics = {"validation_loss": (sums[0] / sums[2]).item(), "accuracy": (sums[1] / sums[2]).item()}
    amp_common.PROBE.extra["validation"] = metrics
    if rank == 0:
        print(f"[validation] batch {batches:6d}  " + "  ".join(f"{k} {v:.5g}" for k, v in metrics.items()))
    amp_common.PROBE.write()
    if hvd is not None:
        hvd.shutdown()
    if ddp:
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
