"""Run by test_training_options under horovodrun -np 2: OptimizerStep with Horovod's DistributedOptimizer and
a GradScaler (fp16 autocast on CPU; the harness offers it on CUDA only, the step order is the same).

Rank 1 makes its gradients infinite in chosen batches. After the allreduce every rank holds the inf, so every
rank must skip exactly those optimizer steps and keep identical weights; unscaling before the synchronize
(the known trap) would unscale only this rank's own gradients. Writes rank<N>.pt in the working directory.
"""

import horovod.torch as hvd
import torch

from harness.config.optimizations import TrainingOptions
from harness.train.optimizer_step import OptimizerStep

K = 2  # aggregation window: the inf enters in the first batch of a window, the synchronize is at its end
POISONED = {3, 10}  # batches (1-based) where rank 1's loss is infinite: windows 2 and 5 are skipped

hvd.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
options = TrainingOptions(aggregation_frequency=K, precision="fp16", clip_grad_l2_norm=1.0)
optimizer = hvd.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    named_parameters=model.named_parameters(),
    backward_passes_per_step=K,
)
step = OptimizerStep(optimizer, None, options, torch.device("cpu"))
step.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # small enough not to overflow by itself
data = torch.Generator().manual_seed(1 + hvd.rank())
for batch in range(1, 13):
    x = torch.randn(8, 16, generator=data)
    y = torch.randint(0, 4, (8,), generator=data)
    with step.forward():
        loss = torch.nn.functional.cross_entropy(model(x), y)
    if hvd.rank() == 1 and batch in POISONED:
        loss = loss * float("inf")
    step.step(loss)
result = {
    "skipped": step.skipped,
    "expected_skips": len(POISONED),
    "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
}
torch.save(result, f"rank{hvd.rank()}.pt")
print(f"rank {hvd.rank()}: skipped {step.skipped}, scale {step.scaler.get_scale()}", flush=True)
hvd.shutdown()
