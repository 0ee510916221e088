"""The optimizer step: what happens between a batch's loss and the next batch, in one object.

The loop runs each batch's forward pass inside `forward()` (autocast under mixed precision) and then calls
`step(loss)`. That does the backward pass and, at the end of each aggregation window of k batches:

    synchronize (Horovod's allreduce) -> unscale (fp16) -> average over k -> clip -> optimizer step
    (skipping Horovod's own synchronize, and skipped by the GradScaler on inf/NaN) -> zero_grad -> LR step

Clipping after the synchronize and the unscale is what makes it act on the averaged, true gradients, the same
at any number of ranks. `end_epoch()` steps an epoch-wise LR scheduler.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Dict, List, Optional

import torch

from harness.api.lr_scheduler import LRScheduler, StepMode
from harness.config.optimizations import TrainingOptions
from harness.errors import HarnessError

_EVERY_STEP = (StepMode.STEP_EVERY_BATCH, StepMode.STEP_EVERY_OPTIMIZER_STEP)  # PEDL's trials: the same
_NOTHING = contextlib.nullcontext()  # stateless: one for every batch (no autocast, no Horovod)


class OptimizerStep:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Optional[LRScheduler] = None,
        options: Optional[TrainingOptions] = None,
        device: Optional[torch.device] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        no_sync: Optional[Callable[[], ContextManager[Any]]] = None,
    ):
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.options = options = options or TrainingOptions()
        self.k = options.aggregation_frequency
        self._every_batch = scheduler is not None and scheduler.step_mode in _EVERY_STEP
        self._every_epoch = scheduler is not None and scheduler.step_mode is StepMode.STEP_EVERY_EPOCH
        self._used_lrs: Optional[List[float]] = None
        # Horovod's DistributedOptimizer: gradients are allreduced by its hooks; we synchronize explicitly.
        self._horovod = hasattr(optimizer, "synchronize") and hasattr(optimizer, "skip_synchronize")
        # DDP (the torch backend) averages at the backward pass of every forward pass outside its no_sync.
        self._no_sync = no_sync
        self._device_type = device_type = (device or torch.device("cpu")).type
        self._fp32 = options.autocast_dtype is None
        # The context API shares one scaler among its optimizers and updates it once per batch (`scaler`).
        self._own_scaler = scaler is None
        if scaler is None and options.precision == "fp16":
            scaler = torch.amp.GradScaler(device_type)
        self.scaler = scaler
        self.pending = 0  # batches whose gradients are accumulated but not yet applied
        # Optimizer steps the GradScaler skipped (inf/NaN gradients), counted on the device: reading the
        # scale as a number every step would make the CPU wait for the GPU before queueing the next batch.
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped_reported = 0
        self.optimizer.zero_grad()

    def forward(self) -> ContextManager[Any]:
        """The context of a forward pass and its loss (autocast, or nothing); within an aggregation window
        but at its end, also DDP's no_sync (the torch backend)."""
        autocast = _NOTHING if self._fp32 else self.options.autocast(self._device_type)
        if self._no_sync is None or self.k == 1 or self.ends_window():
            return autocast
        stack = contextlib.ExitStack()
        stack.enter_context(self._no_sync())
        stack.enter_context(autocast)
        return stack

    def step(self, loss: torch.Tensor) -> None:
        """Backward for this batch; the optimizer steps when the aggregation window is complete."""
        self.backward(loss)
        self.pending += 1
        if self.pending < self.k:
            return
        self.apply()

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """The backward pass of `loss`, scaled under fp16 (`kwargs`: those of ``Tensor.backward``)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward(**kwargs)
        else:
            loss.backward(**kwargs)

    def ends_window(self) -> bool:
        """Whether the next `step` ends an aggregation window (always, without aggregation)."""
        return self.pending + 1 >= self.k

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def apply(
        self, clip: Optional[Callable[[List[torch.Tensor]], None]] = None, zero_grads: bool = True
    ) -> None:
        """The end of a window: synchronize, unscale, average over the window, clip (`clip`, else the
        config's clipping), step, zero the gradients (unless `zero_grads` is False)."""
        opt, scaler = self.optimizer, self.scaler
        if self._horovod:
            opt.synchronize()  # type: ignore[attr-defined]
        if scaler is not None:
            scaler.unscale_(opt)
        if self.k > 1 and self.options.average_aggregated_gradients:
            for p in self._params():
                if p.grad is not None:
                    p.grad.div_(self.k)
        if clip is not None:
            clip(self._params())
        elif self.options.clip_grad_l2_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params(), self.options.clip_grad_l2_norm)
        elif self.options.clip_grad_val is not None:
            torch.nn.utils.clip_grad_value_(self._params(), self.options.clip_grad_val)
        with opt.skip_synchronize() if self._horovod else _NOTHING:  # type: ignore
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if self._own_scaler and scaler is not None:
            self.update_scaler()
        if zero_grads:
            opt.zero_grad()
        self.pending = 0
        if self._every_batch:
            self._used_lrs = [g["lr"] for g in opt.param_groups]
            self.scheduler.scheduler.step()  # type: ignore[union-attr]

    def update_scaler(self) -> None:
        """The loss scaler's update after a step (once per batch, however many optimizers stepped)."""
        scaler = self.scaler
        if scaler is not None and scaler._scale is not None:  # the device tensor (get_scale() would sync)
            before = scaler._scale.clone()
            scaler.update()
            after = scaler._scale
            if after is not None:
                self._skipped += after < before  # the scale backs off exactly after a skipped step

    def end_epoch(self) -> None:
        if self._every_epoch:
            self.scheduler.scheduler.step()  # type: ignore[union-attr]

    @property
    def skipped(self) -> int:
        """Optimizer steps skipped by the fp16 loss scaler so far (0 without one)."""
        return int(self._skipped.item())

    def report(self) -> Dict[str, Any]:
        """What a training report adds: `lr` (the rate the last step used), and under fp16 the loss scale and
        the steps skipped since the last report. The same on every rank."""
        out: Dict[str, Any] = {}
        lrs = self._learning_rates()
        if lrs is not None:
            out["lr"] = lrs[0] if len(lrs) == 1 else lrs
        if self.scaler is not None:
            skipped = self.skipped
            out["loss_scale"] = self.scaler.get_scale()
            out["skipped_steps"] = skipped - self._skipped_reported
            self._skipped_reported = skipped
        return out

    def _learning_rates(self) -> Optional[List[float]]:
        if self.scheduler is None:
            return None
        if self._every_batch and self._used_lrs is not None:
            return list(self._used_lrs)
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    # --- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps besides the optimizer's own state (the same on every rank)."""
        state: Dict[str, Any] = {"pending": self.pending, "k": self.k}
        if self.scheduler is not None:
            state["lr_scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
            state["skipped"] = self.skipped
        return state

    def prepare_checkpoint(self) -> None:
        """On every rank before a checkpoint (nothing to gather here; the context API's step has)."""

    def local_gradients(self) -> Optional[List[Optional[torch.Tensor]]]:
        """This rank's gradients accumulated in an unfinished aggregation window (None between windows): a
        checkpoint in mid-window keeps every rank's, so that the resumed window ends exactly the same."""
        if self.pending == 0:
            return None
        return [None if p.grad is None else p.grad.detach().cpu().clone() for p in self._params()]

    def load_state_dict(self, state: Dict[str, Any], gradients: Optional[List[Any]] = None) -> None:
        """Restore after the optimizer's own load_state_dict (which resets Horovod's window counters)."""
        self._load_scheduler(state.get("lr_scheduler"))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
            self._skipped_reported = int(state.get("skipped", 0))
            self._skipped.fill_(self._skipped_reported)
        pending = int(state.get("pending", 0))
        if pending == 0:
            return
        if gradients is None or state.get("k") != self.k:
            raise HarnessError(
                "the checkpoint was taken in the middle of an aggregation window, and its gradients do not "
                "fit this run; start over with --fresh or use another --output"
            )
        for p, g in zip(self._params(), gradients):
            p.grad = None if g is None else g.to(p.device)
        self.pending = pending
        if self._horovod:  # the allreduce hooks count down the window per parameter
            for p in self.optimizer._allreduce_delay:  # type: ignore[attr-defined]
                self.optimizer._allreduce_delay[p] = self.k - pending  # type: ignore[attr-defined]

    def _load_scheduler(self, saved: Any) -> None:
        if self.scheduler is None:
            return  # a scheduler removed since the checkpoint: the optimizer's state carries the LR
        if saved is None:
            raise HarnessError(
                "the checkpoint has no LR scheduler state, but the trial now defines create_lr_scheduler(); "
                "start over with --fresh or use another --output"
            )
        self.scheduler.load_state_dict(saved)
