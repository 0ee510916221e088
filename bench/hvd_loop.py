"""The hand-written Horovod loop: the canonical horovod.torch pattern, nothing else.

DistributedSampler, DistributedOptimizer, broadcast of rank 0's state, a plain loop that prints the loss every
`--log-every` batches on rank 0, then one validation pass (each rank its share of the records, no padding)
with one allreduce of (loss sum, correct, count). The physical limit that the harness can approach.

The training options, written the way Horovod's documentation does them (the harness's `optimizations:` do
the same things):

- `--aggregation K`: `DistributedOptimizer(..., backward_passes_per_step=K)` (its hooks allreduce on every
  K-th backward pass only); every K-th batch `optimizer.synchronize()`, each gradient divided by K (the mean
  of the K batches' gradients), `optimizer.step()` under `optimizer.skip_synchronize()`, `zero_grad()`.
  `--batches` counts batches: there are batches / K optimizer steps;
- `--compression fp16`: `compression=hvd.Compression.fp16` (gradients allreduced as float16);
- `--precision bf16`: `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward pass and the loss, in
  training and in validation (as the harness does); no loss scaler: bf16 has float32's range.

    horovodrun -np 2 -H localhost:2 python bench/hvd_loop.py --workload conv --batches 300
    horovodrun -np 2 -H localhost:2 python bench/hvd_loop.py --workload mlp --batches 400 --aggregation 4
"""

import argparse
import contextlib
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
    p.add_argument("--aggregation", type=int, default=1, help="optimizer step every K batches")
    p.add_argument("--compression", choices=("none", "fp16"), default="none", help="allreduce gradients as")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast the forward pass")
    args = p.parse_args()
    k = args.aggregation
    if k < 1 or args.batches % k:
        p.error(f"--aggregation {k}: expected an integer >= 1 that divides --batches ({args.batches})")
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
    optimizer = hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        backward_passes_per_step=k,
        compression=hvd.Compression.fp16 if args.compression == "fp16" else hvd.Compression.none,
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def autocast():
        if args.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    model.train()
    step, epoch = 0, 0  # step counts batches
    while step < args.batches:
        sampler.set_epoch(epoch)
        for x, y in train_loader:
            if k == 1:
                optimizer.zero_grad()
                with autocast():
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
            else:
                with autocast():
                    loss = F.cross_entropy(model(x), y)
                loss.backward()  # Horovod's hooks allreduce on every k-th backward pass only
                if (step + 1) % k == 0:
                    optimizer.synchronize()
                    for group in optimizer.param_groups:
                        for param in group["params"]:
                            if param.grad is not None:
                                param.grad.div_(k)
                    with optimizer.skip_synchronize():
                        optimizer.step()
                    optimizer.zero_grad()
            step += 1
            if step % args.log_every == 0 and hvd.rank() == 0:
                print(f"batch {step} loss {loss.item():.4f}", flush=True)
            if step >= args.batches:
                break
        epoch += 1

    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad(), autocast():  # validation under the same autocast as training, as the harness does
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
