"""The optimizer step: what happens between a batch's loss and the next batch, in one object.

The loop calls `zero_grad()` before a batch, `step(loss)` after computing its loss (backward, the
optimizer's step, the LR scheduler in STEP_EVERY_BATCH mode) and `end_epoch()` after each training epoch.
Later training options (aggregation, mixed precision, clipping) belong here too, not in the loop.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from harness.errors import HarnessError
from harness.lr_scheduler import LRScheduler, StepMode


class OptimizerStep:
    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Optional[LRScheduler] = None):
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._every_batch = scheduler is not None and scheduler.step_mode is StepMode.STEP_EVERY_BATCH
        self._every_epoch = scheduler is not None and scheduler.step_mode is StepMode.STEP_EVERY_EPOCH
        self._used_lrs: Optional[List[float]] = None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        if self._every_batch:
            self._used_lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.scheduler.scheduler.step()  # type: ignore[union-attr]

    def end_epoch(self) -> None:
        if self._every_epoch:
            self.scheduler.scheduler.step()  # type: ignore[union-attr]

    def learning_rates(self) -> Optional[List[float]]:
        """The learning rate of each parameter group for the last batch (None without a scheduler)."""
        if self.scheduler is None:
            return None
        if self._every_batch and self._used_lrs is not None:
            return list(self._used_lrs)
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps besides the optimizer's own state: the scheduler's."""
        return {"lr_scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = state.get("lr_scheduler")
        if self.scheduler is None:
            return  # a scheduler removed since the checkpoint: the optimizer's state carries the LR
        if saved is None:
            raise HarnessError(
                "the checkpoint has no LR scheduler state, but the trial now defines create_lr_scheduler(); "
                "start over with --fresh or use another --output"
            )
        self.scheduler.load_state_dict(saved)
