"""`LRScheduler`: a torch LR scheduler and when the harness steps it (PEDL's wrapper, both signatures).

PEDL's later form is ``LRScheduler(scheduler, step_mode=LRScheduler.StepMode.STEP_EVERY_BATCH)``; its
earlier one ``LRScheduler(scheduler, step_every_batch=True)`` / ``step_every_epoch=True`` (neither: the
trial steps it). The scheduler's state is saved in every checkpoint and restored on resume.
"""

from __future__ import annotations

import enum
from typing import Any, Dict, List, Optional

from harness.errors import HarnessError


class StepMode(enum.Enum):
    STEP_EVERY_EPOCH = 1  # the harness calls scheduler.step() after every training epoch
    STEP_EVERY_BATCH = 2  # ... after every optimizer step
    MANUAL_STEP = 3  # never by the harness: the trial calls step() on this wrapper itself
    STEP_EVERY_OPTIMIZER_STEP = 4  # Determined's name for after every optimizer step


_Mode = StepMode  # for annotations inside LRScheduler, where `StepMode` names the class attribute


class LRScheduler:
    """Wrap a ``torch.optim.lr_scheduler`` scheduler, saying when it is stepped (see `StepMode`)."""

    StepMode = StepMode  # PEDL wrote LRScheduler.StepMode.STEP_EVERY_BATCH

    def __init__(
        self,
        scheduler: Any,
        step_mode: Optional[_Mode] = None,
        *,
        step_every_batch: bool = False,
        step_every_epoch: bool = False,
        frequency: int = 1,
    ):
        if scheduler is None or not callable(getattr(scheduler, "step", None)):
            raise HarnessError(f"LRScheduler() needs a torch LR scheduler, got a {type(scheduler).__name__}")
        if step_mode is None:  # PEDL's earlier keyword form
            if step_every_batch and step_every_epoch:
                raise HarnessError("LRScheduler(): step_every_batch and step_every_epoch are both set")
            step_mode = (
                StepMode.STEP_EVERY_BATCH
                if step_every_batch
                else StepMode.STEP_EVERY_EPOCH
                if step_every_epoch
                else StepMode.MANUAL_STEP
            )
        elif step_every_batch or step_every_epoch:
            raise HarnessError("LRScheduler(): give step_mode or step_every_batch/epoch, not both")
        if not isinstance(step_mode, StepMode):
            raise HarnessError(
                f"LRScheduler(): step_mode {step_mode!r} is not one of LRScheduler.StepMode's "
                "STEP_EVERY_EPOCH, STEP_EVERY_BATCH, MANUAL_STEP"
            )
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise HarnessError(f"LRScheduler(): frequency must be a positive integer, got {frequency!r}")
        self.scheduler = scheduler
        self.step_mode = step_mode
        self.frequency = frequency  # Determined's: step the scheduler every `frequency` batches/epochs

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step the scheduler; only in MANUAL_STEP mode (otherwise the harness steps it)."""
        if self.step_mode is not StepMode.MANUAL_STEP:
            raise HarnessError(
                f"LRScheduler.step() called by the trial, but its step mode is {self.step_mode.name}: "
                "the harness steps it (use StepMode.MANUAL_STEP to step it yourself)"
            )
        self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> List[float]:
        return list(self.scheduler.get_last_lr())

    def get_lr(self) -> List[float]:  # PEDL's name
        return self.get_last_lr()

    def state_dict(self) -> Dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
