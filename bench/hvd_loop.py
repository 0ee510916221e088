"""The hand-written Horovod loop: the canonical horovod.torch pattern, nothing else.

DistributedSampler, DistributedOptimizer, broadcast of rank 0's state, a plain loop that prints the loss every
`--log-every` batches on rank 0, then one validation pass (each rank its share of the records, no padding)
with one allreduce of (loss sum, correct, count). The physical limit that the harness can approach.

    horovodrun -np 2 -H localhost:2 python bench/hvd_loop.py --workload conv --batches 300
"""

import argparse
import os
import sys

import horovod.torch as hvd
import torch
import torch.nn.functional as F
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

    hvd.init()
    torch.set_num_threads(common.threads_per_rank(hvd.local_size()))
    w = common.WORKLOADS[args.workload]
    torch.manual_seed(common.SEED)

    train_set, val_set = common.datasets()
    sampler = DistributedSampler(
        train_set, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=True, seed=common.SEED
    )
    train_loader = DataLoader(
        train_set, batch_size=w.global_batch // hvd.size(), sampler=sampler, drop_last=True
    )
    val_shard = Subset(val_set, range(hvd.rank(), len(val_set), hvd.size()))
    val_loader = DataLoader(val_shard, batch_size=common.VAL_BATCH)

    model = common.build_model(args.workload)
    optimizer = common.build_optimizer(args.workload, model)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

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
            if step % args.log_every == 0 and hvd.rank() == 0:
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
    sums = hvd.allreduce(sums, op=hvd.Sum, name="validation")
    metrics = {"loss": (sums[0] / sums[2]).item(), "accuracy": (sums[1] / sums[2]).item()}
    common.PROBE.validation_done(metrics)
    model.train()
    if hvd.rank() == 0:
        print(f"validation {metrics}", flush=True)
    common.PROBE.write()
    hvd.shutdown()


if __name__ == "__main__":
    main()
