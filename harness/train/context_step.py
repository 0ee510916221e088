"""`ContextStep`: a context trial's optimizer steps, schedulers and callbacks as the one object the loop calls
`step` on, and that the run state saves and restores; `Optimizers`: several optimizers' state as one.

The loop calls ``step.step(loss)`` after each batch; for a context trial that is what Determined's loop did
after ``train_batch``: one loss-scaler update, the LR schedulers' steps (Determined's rules for each step
mode and frequency), the aggregation window's count.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, List, Optional

import torch

from harness.api.lr_scheduler import StepMode
from harness.errors import HarnessError
from harness.train.context import Context


class ContextStep:
    """What the loop calls around each batch of a context trial: the forward pass's autocast, and after the
    batch the scaler update, the LR schedulers and the aggregation window's count; it saves and restores
    every optimizer step, scheduler and callback as one."""

    def __init__(self, context: Context, batches_per_epoch: int):
        self.context = context
        self.steps = context.steps
        self.k = context.options.aggregation_frequency
        self.pending = 0  # batches of the current window already trained
        self.batches = 0  # batches trained (global), for the schedulers' frequency
        self.epochs = 0
        self.batches_per_epoch = batches_per_epoch
        context.window_ends = self.k == 1
        self.optimizer = Optimizers([s.optimizer for s in self.steps])
        # Training reducers' per-slot results of the unreported window: taken at a checkpoint (`window`),
        # and after a resume reduced with the next report (`carried`).
        self.window: Dict[str, List[Any]] = {}
        self.carried: Dict[str, List[Any]] = {}
        for s in self.steps:
            s.optimizer.zero_grad()

    def forward(self) -> ContextManager[Any]:
        """train_batch's context: autocast, and within an aggregation window but at its end, DDP's no_sync
        (the torch backend; Horovod's optimizer counts the window itself)."""
        autocast = self.context.options.autocast(self.context.device.type)
        if self.context.window_ends:
            return autocast
        stack = contextlib.ExitStack()
        stack.enter_context(self.context.backend.no_sync())
        stack.enter_context(autocast)
        return stack

    def step(self, loss: Optional[torch.Tensor]) -> None:
        """After the trial's train_batch: the window's count, and at its end the scaler and schedulers."""
        ended = self.context.window_ends
        self.pending = 0 if ended else self.pending + 1
        self.batches += 1
        if ended:
            if self.context.scaler is not None:
                self.steps[0].update_scaler()
            for sched in self.context.schedulers:
                mode = sched.step_mode
                if mode is StepMode.STEP_EVERY_BATCH:  # every batch of the window, counted
                    for b in range(self.batches - self.k, self.batches):
                        if (b + 1) % sched.frequency == 0:
                            sched.scheduler.step()
                elif (
                    mode is StepMode.STEP_EVERY_OPTIMIZER_STEP
                    and (self.batches // self.k) % sched.frequency == 0
                ):
                    sched.scheduler.step()
        self.context.window_ends = self.pending + 1 >= self.k

    def ends_window(self) -> bool:
        return self.pending + 1 >= self.k

    def end_epoch(self) -> None:
        self.epochs += 1
        for sched in self.context.schedulers:
            if sched.step_mode is StepMode.STEP_EVERY_EPOCH and self.epochs % sched.frequency == 0:
                sched.scheduler.step()

    @property
    def skipped(self) -> int:
        return self.steps[0].skipped

    def report(self) -> Dict[str, Any]:
        out = self.steps[0].report()
        out.update(self.context.reduce_metrics(False, self.carried))  # a collective: every rank reports
        self.carried = {}
        if self.context.schedulers:
            lrs = [float(g["lr"]) for g in self.steps[0].optimizer.param_groups]
            out["lr"] = lrs[0] if len(lrs) == 1 else lrs
        return out

    def prepare_checkpoint(self) -> None:
        """On every rank before a checkpoint: the training reducers' window so far (a collective)."""
        self.window = self.context.gather_slots(for_validation=False)

    def state_dict(self) -> Dict[str, Any]:
        window = {name: self.carried.get(name, []) + slots for name, slots in self.window.items()}
        state: Dict[str, Any] = {
            "reducer_window": window,
            "pending": self.pending,
            "k": self.k,
            "batches": self.batches,
            "epochs": self.epochs,
            "lr_schedulers": [s.state_dict() for s in self.context.schedulers],
            "callbacks": {name: c.state_dict() for name, c in self.context.callbacks.items()},
        }
        if self.context.scaler is not None:
            state["scaler"] = self.context.scaler.state_dict()
            state["skipped"] = self.skipped
        for callback in self.context.callbacks.values():  # rank 0, which writes the checkpoint
            hook = getattr(callback, "on_checkpoint_save_start", None)
            if hook is not None:
                hook(state)
        return state

    def local_gradients(self) -> Optional[List[Optional[torch.Tensor]]]:
        if self.pending == 0:
            return None
        params = [p for s in self.steps for p in s._params()]
        return [None if p.grad is None else p.grad.detach().cpu().clone() for p in params]

    def load_state_dict(self, state: Dict[str, Any], gradients: Optional[List[Any]] = None) -> None:
        context = self.context
        for callback in context.callbacks.values():  # every rank, before anything is restored
            hook = getattr(callback, "on_checkpoint_load_start", None)
            if hook is not None:
                hook(state)
        saved = state.get("lr_schedulers")
        if saved is None or len(saved) != len(context.schedulers):
            raise HarnessError(
                f"the checkpoint has {len(saved or [])} LR scheduler(s), the trial wraps "
                f"{len(context.schedulers)}; start over with --fresh or use another --output"
            )
        for s, st in zip(context.schedulers, saved):
            s.load_state_dict(st)
        callbacks = state.get("callbacks", {})
        for name, c in context.callbacks.items():
            if name in callbacks:
                c.load_state_dict(callbacks[name])
        if context.scaler is not None and "scaler" in state:
            context.scaler.load_state_dict(state["scaler"])
            step0 = self.steps[0]
            step0._skipped_reported = int(state.get("skipped", 0))
            step0._skipped.fill_(step0._skipped_reported)
        self.batches, self.epochs = int(state.get("batches", 0)), int(state.get("epochs", 0))
        self.carried = dict(state.get("reducer_window") or {})
        pending = int(state.get("pending", 0))
        if pending:
            if gradients is None or state.get("k") != self.k:
                raise HarnessError(
                    "the checkpoint was taken in the middle of an aggregation window, and its gradients do "
                    "not fit this run; start over with --fresh or use another --output"
                )
            params = [p for s in self.steps for p in s._params()]
            for p, g in zip(params, gradients):
                p.grad = None if g is None else g.to(p.device)
            for step in self.steps:
                if step._horovod:  # the allreduce hooks count down the window per parameter
                    opt = step.optimizer
                    passes = opt.backward_passes_per_step  # type: ignore[attr-defined]  # k x the trial's
                    for p in opt._allreduce_delay:  # type: ignore[attr-defined]
                        opt._allreduce_delay[p] = passes - pending * (passes // self.k)  # type: ignore
        self.pending = pending
        context.window_ends = self.pending + 1 >= self.k


class Optimizers:
    """Several optimizers saved and restored as one (the checkpoint's optimizer state: a list)."""

    def __init__(self, optimizers: List[Any]):
        self.optimizers = optimizers

    def state_dict(self) -> Any:
        states = [o.state_dict() for o in self.optimizers]
        return states[0] if len(states) == 1 else {"optimizers": states}

    def load_state_dict(self, state: Any) -> None:
        states = state["optimizers"] if isinstance(state, dict) and "optimizers" in state else [state]
        if len(states) != len(self.optimizers):
            raise HarnessError(
                f"the checkpoint holds {len(states)} optimizer(s), the trial wraps {len(self.optimizers)}; "
                "start over with --fresh or use another --output"
            )
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)
