"""torchrun + DistributedDataParallel (Gloo): the same loop as bench/hvd_loop.py, on PyTorch's own DDP.

torchrun --standalone --nproc_per_node 2 bench/ddp_loop.py --workload conv --batches 300
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads"))
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", choices=sorted(common.WORKLOADS), required=True)
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args()
    common.PROBE.install()

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(common.threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", size))))
    w = common.WORKLOADS[args.workload]
    torch.manual_seed(common.SEED)

    train_set, val_set = common.datasets()
    sampler = DistributedSampler(train_set, num_replicas=size, rank=rank, shuffle=True, seed=common.SEED)
    train_loader = DataLoader(train_set, batch_size=w.global_batch // size, sampler=sampler, drop_last=True)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), size)), batch_size=common.VAL_BATCH)

    # By default DDP broadcasts rank 0's parameters. BENCH_DDP_KWARGS (bench/ab_np2.py --ddp-variant): DDP's
    # keywords as JSON, to time the harness's own choices (init_sync=False, broadcast_buffers=False) on the
    # hand-written loop; unset in `make bench`.
    ddp_kwargs = json.loads(os.environ.get("BENCH_DDP_KWARGS", "{}"))
    model = DistributedDataParallel(common.build_model(args.workload), **ddp_kwargs)
    optimizer = common.build_optimizer(args.workload, model)

    model.train()
    step, epoch = 0, 0
    while step < args.batches:
        sampler.set_epoch(epoch)
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.log_every == 0 and rank == 0:
                print(f"batch {step} loss {loss.item():.4f}", flush=True)
            if step >= args.batches:
                break
        epoch += 1

    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for x, y in val_loader:
            out = model(x)
            sums[0] += F.cross_entropy(out, y, reduction="sum")
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
    dist.all_reduce(sums)
    metrics = {"loss": (sums[0] / sums[2]).item(), "accuracy": (sums[1] / sums[2]).item()}
    common.PROBE.validation_done(metrics)
    model.train()
    if rank == 0:
        print(f"validation {metrics}", flush=True)
    common.PROBE.write()
    dist.barrier()  # no rank tears Gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
