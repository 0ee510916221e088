"""torch.distributed's collectives, with gradients averaged by DistributedDataParallel: the backend for jobs
started by torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), and the way
to run when Horovod cannot be built.

Gradients: each model that an optimizer trains is given a DDP reducer (bucketed allreduces overlapped with
the backward pass, fp16 compression by a comm hook in Horovod's order), but the trial keeps its own module:
its class is swapped for a subclass whose ``__call__`` runs the forward pass through DDP while gradients
are being recorded. So ``model.fc``, ``model.state_dict()`` and ``isinstance`` see what they saw under
Horovod, and checkpoints are the same under both backends. Aggregation windows use ``no_sync``
(`no_sync()`). At two ranks training gives the same bits as under Horovod (tests/integration/
test_backends.py says why).

The harness's own collectives (metrics, stop votes, objects) go through a Gloo group of their own: they work
on CPU tensors under NCCL too, and never queue behind DDP's buckets.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from harness.distributed import watchdog
from harness.distributed.backend import dumps, loads
from harness.errors import HarnessError, PeerFailure

if TYPE_CHECKING:
    from harness.config.optimizations import TrainingOptions

T = TypeVar("T")

# A collective that waits longer than this raises; the harness's stall watchdog (stall_timeout) normally
# ends a stuck job long before, naming where it is stuck.
TIMEOUT = datetime.timedelta(hours=2)

_inside = threading.local()  # set while DDP's forward calls back into the module

# How Gloo says that a peer's connection broke (its process died, or its machine): RuntimeErrors whose
# message names Gloo's transport, e.g. "[.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:6359:
# Connection reset by peer. This is typically caused by ...".
_GLOO_TRANSPORT = re.compile(r"gloo[/\\]transport[/\\]")
_NCCL_PEER = re.compile(r"remote process exited or there was a network error|communicator was aborted")
_REASONS = [re.compile(r) for r in (r"Connection \w+ by peer", r"Timed out[^.]*", r"Read error|Write error")]


def torchrun_environment(env: Any = None) -> bool:
    """Whether torchrun (or a launcher that sets what torchrun sets) started this process as one of N."""
    env = os.environ if env is None else env
    return all(v in env for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def peer_failure(e: BaseException) -> Optional[PeerFailure]:
    """The `PeerFailure` that `e` means when it says that another rank is gone (a connection broken inside a
    collective: DDP's gradient allreduce or one of the harness's), else None. That rank, or the launcher,
    reports the cause; this rank's error is a consequence (cli.py: said only if no one stops this rank)."""
    text = str(e)
    # (A DistBackendError alone is not enough: a mismatched collective of the trial's own is one too.)
    if not (isinstance(e, dist.DistNetworkError) or _GLOO_TRANSPORT.search(text) or _NCCL_PEER.search(text)):
        return None
    reason = next((found.group(0) for r in _REASONS for found in [r.search(text)] if found), None)
    said = reason or (text.splitlines()[0][:200] if text else type(e).__name__)
    return PeerFailure(f"another rank is gone: a collective lost its connection to it ({said})")


class TorchDistributed:
    """torch.distributed: Gloo on CPU, NCCL on CUDA; DDP's reducer averages the gradients."""

    controller = "gloo"  # the harness's own collectives: a Gloo group (run_on_chief's heartbeat path)
    name = "torch"

    def __init__(self) -> None:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.cross_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
        self._cuda = cuda
        # Under Gloo DDP and the harness share no group either: a vote in flight never interleaves with
        # DDP's bucket allreduces, and run_on_chief's heartbeat thread has its own.
        self._group = dist.new_group(backend="gloo", timeout=TIMEOUT)
        self._ddp: Dict[int, DistributedDataParallel] = {}  # id(module) -> its reducer

    # --- the harness's collectives -------------------------------------------------------------------

    def _reduce(self, t: torch.Tensor, op: Any) -> torch.Tensor:
        out = t.clone()
        if out.is_cuda:  # metrics kept on the GPU: NCCL's group
            dist.all_reduce(out, op=op)
        else:
            dist.all_reduce(out, op=op, group=self._group)
        return out

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def allreduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MIN)

    def start_sum(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        out = t.clone()
        group = None if out.is_cuda else self._group
        work = dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group, async_op=True)
        assert work is not None  # async_op=True

        def wait() -> torch.Tensor:
            work.wait()
            return out

        return wait

    def allgather_object(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.size
        dist.all_gather_object(out, dumps(obj), group=self._group)
        return [loads(b) for b in out]

    def broadcast_object(self, obj: T) -> T:
        box: List[Any] = [dumps(obj) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return loads(box[0])

    def start_vote(self, stop: bool, interval: int) -> Any:
        vote = torch.tensor([int(stop), interval], dtype=torch.int64)
        return vote, dist.all_reduce(vote, group=self._group, async_op=True)

    def finish_vote(self, handle: Any) -> Tuple[bool, int]:
        vote, work = handle
        work.wait()
        stops, intervals = vote.tolist()
        return stops > 0, max(1, intervals // self.size)

    # --- gradients -----------------------------------------------------------------------------------

    def wrap_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        options: Optional[TrainingOptions] = None,
        backward_passes: int = 1,
    ) -> torch.optim.Optimizer:
        """Give each model that `optimizer` trains a DDP reducer (once, however many optimizers share it);
        the optimizer itself is returned as it is. `model` may be a ModuleList of several models (the
        context API's): each gets its own, as Determined's wrap_model did."""
        trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
        models = list(model) if isinstance(model, torch.nn.ModuleList) else [model]
        for m in models:
            if id(m) not in self._ddp and any(id(p) in trained for p in m.parameters()):
                self._ddp[id(m)] = self._attach(m, options)
        return optimizer

    def _attach(self, module: torch.nn.Module, options: Optional[TrainingOptions]) -> DistributedDataParallel:
        device = next(module.parameters()).device
        with warnings.catch_warnings():  # broadcast_buffers=False is what we mean (see below)
            warnings.simplefilter("ignore", FutureWarning)
            ddp = DistributedDataParallel(
                module,
                device_ids=[device.index] if device.type == "cuda" else None,
                # Each rank keeps its own buffers (BatchNorm's running statistics), as under Horovod: the same
                # results on both backends, and validation on each rank's shard with that rank's statistics.
                broadcast_buffers=False,
                init_sync=False,  # broadcast_model() sends rank 0's state once the run state is restored
                process_group=None,
            )
        if options is not None and options.gradient_compression:
            ddp.register_comm_hook(self.size, _fp16_compressed)
        _route_through(module, ddp)
        # A rank whose backward pass waits for a peer's gradients is in autograd's engine (the reducer's
        # wait is C++): the stall watchdog gives the stuck peer its grace to report first.
        watchdog.waiting_also_in(os.sep + os.path.join("torch", "autograd") + os.sep)
        return ddp

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """Forward passes inside accumulate their gradients on this rank only (an aggregation window's
        batches but the last); the last batch's backward pass averages the whole window's."""
        stack = contextlib.ExitStack()
        for ddp in self._ddp.values():
            stack.enter_context(ddp.no_sync())
        return stack

    def broadcast_model(self, model: torch.nn.Module) -> None:
        for t in model.state_dict().values():
            if isinstance(t, torch.Tensor):
                if t.is_cuda:
                    dist.broadcast(t, src=0)
                else:
                    dist.broadcast(t, src=0, group=self._group)

    def shutdown(self) -> None:
        dist.destroy_process_group()


def _route_through(module: torch.nn.Module, ddp: DistributedDataParallel) -> None:
    """Make ``module(...)`` run through `ddp` while autograd records (training): its class becomes a
    subclass, of the same name, whose ``__call__`` does that; DDP's own call back into the module runs the
    module's hooks and forward once, as usual."""
    cls, inner = type(module), module

    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Evaluation, DDP's own call back, and a copy of the module (copy.deepcopy keeps the class) run as
        # they are. (`inner`, not `ddp.module`: nn.Module's __getattr__ is slow, and this runs twice a batch.)
        if (
            getattr(_inside, "on", False)
            or not (torch.is_grad_enabled() and self.training)
            or self is not inner
        ):
            return cls.__call__(self, *args, **kwargs)
        _inside.on = True
        try:
            return ddp(*args, **kwargs)
        except RuntimeError as e:
            unused = _unused_parameters(e, self)
            if unused is None:
                raise
            raise HarnessError(
                f"{cls.__name__}'s parameter(s) {', '.join(unused)} got no gradient in the last training "
                "batch (not used to compute the loss): the torch backend's DDP averages every trained "
                "parameter's gradient; use them in forward(), or set requires_grad=False on them"
            ) from None
        finally:
            _inside.on = False

    routed = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    routed.__qualname__ = cls.__qualname__
    module.__class__ = routed


def _fp16_compressed(size: int, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's communication hook for gradient compression, in Horovod's order (Compression.fp16 with
    op=Average): the gradients are rounded to fp16, summed, and the fp16 sum scaled by 1/size, then widened
    back. DDP's own fp16_compress_hook divides before the sum, which rounds small gradients differently (and
    its bf16 hook needs NCCL): this order gives the same bits as Horovod."""
    compressed = bucket.buffer().to(torch.float16)
    work = dist.all_reduce(compressed, async_op=True)
    assert work is not None  # async_op=True

    def widen(fut: torch.futures.Future[List[torch.Tensor]]) -> torch.Tensor:
        buffer = bucket.buffer()
        buffer.copy_(fut.value()[0].mul_(1.0 / size))
        return buffer

    return work.get_future().then(widen)


# DDP checks a hook's annotations as objects; `from __future__ import annotations` made them strings.
_fp16_compressed.__annotations__.update(bucket=dist.GradBucket, size=int)
_fp16_compressed.__annotations__["return"] = torch.futures.Future[torch.Tensor]


_UNUSED = re.compile(r"Parameter indices which did not receive grad for rank \d+: ([\d ]+)")


def _unused_parameters(e: RuntimeError, module: torch.nn.Module) -> Optional[List[str]]:
    """The names of the parameters that DDP says got no gradient (its multi-line error gives their indices
    among the module's trained parameters, in DDP's order), or None for another error."""
    found = _UNUSED.search(str(e))
    if found is None:
        return None
    trained, seen = [], set()
    for prefix, sub in module.named_modules():  # DDP's order (_build_params_for_reducer)
        for name, p in sub.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                trained.append(f"{prefix}.{name}" if prefix else name)
    indices = [int(i) for i in found.group(1).split()]
    return [trained[i] if i < len(trained) else f"#{i}" for i in indices]
