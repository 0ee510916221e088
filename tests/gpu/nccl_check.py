"""One rank per GPU: NCCL allreduce and broadcast on CUDA tensors, checked against the expected values."""

import horovod.torch as hvd
import torch

hvd.init()
torch.cuda.set_device(hvd.local_rank())
assert hvd.nccl_built(), "Horovod was built without NCCL"
x = torch.full((1 << 20,), float(hvd.rank() + 1), device="cuda")
total = hvd.allreduce(x, op=hvd.Sum, name="smoke.sum")
expected = hvd.size() * (hvd.size() + 1) / 2
assert total.is_cuda and torch.allclose(total, torch.full_like(total, expected)), total[:4]
b = hvd.broadcast(torch.arange(8.0, device="cuda") * (hvd.rank() + 1), root_rank=0, name="smoke.bcast")
assert torch.equal(b, torch.arange(8.0, device="cuda"))
print(f"rank {hvd.rank()}/{hvd.size()} on {torch.cuda.get_device_name()}: NCCL allreduce and broadcast OK")
