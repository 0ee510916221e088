"""When the loop's duties are due: a training report, a validation, a periodic checkpoint, the end.

The loop asks after every batch with the global batch count, which is the same on every rank, so every rank
answers alike and takes part in the same collectives. (torchtitan's `validator.should_validate(step)` and
`checkpointer.save(step)` are the model.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, FrozenSet, Iterable, Optional

if TYPE_CHECKING:
    from harness.config import ExperimentConfig, Length


@dataclass(frozen=True)
class Schedule:
    total: int  # batches to train
    report_every: int  # scheduling_unit
    validate_every: Optional[int] = None  # min_validation_period, in batches
    checkpoint_every: Optional[int] = None  # min_checkpoint_period, in batches
    rungs: FrozenSet[int] = field(default_factory=frozenset)  # a search's rungs: a validation each
    initial: bool = False  # perform_initial_validation: a validation before the first batch

    @classmethod
    def of(
        cls, config: ExperimentConfig, batches_per_epoch: int, global_batch: int, rungs: Iterable[int] = ()
    ) -> Schedule:
        """The config's lengths and periods in batches, for an epoch of `batches_per_epoch` batches."""

        def batches(length: Optional[Length]) -> Optional[int]:
            return length.to_batches(batches_per_epoch, global_batch) if length else None

        total = config.searcher.max_length.to_batches(batches_per_epoch, global_batch)
        return cls(
            total,
            config.scheduling_unit,
            batches(config.min_validation_period),
            batches(config.min_checkpoint_period),
            frozenset(rungs),
            config.perform_initial_validation,
        )

    def done(self, batches: int) -> bool:
        return batches >= self.total

    def report_due(self, batches: int) -> bool:
        """A training report: every `report_every` batches, and at the end."""
        return self.done(batches) or batches % self.report_every == 0

    def until_report(self, batches: int) -> int:
        """Batches from `batches` to the next report (the progress bar's length)."""
        return self.report_every - batches % self.report_every

    def validation_due(self, batches: int) -> bool:
        """A validation: every `validate_every` batches, at a search's rungs, and at the end."""
        periodic = self.validate_every is not None and batches % self.validate_every == 0
        return self.done(batches) or periodic or batches in self.rungs

    def initial_validation_due(self, batches: int) -> bool:
        """perform_initial_validation: once, before any batch is trained (not after a resume)."""
        return self.initial and batches == 0

    def next_due(self, batches: int) -> int:
        """The first batch after `batches` at which a report, a validation, a periodic checkpoint or the
        end is due: until then the loop checks nothing (one comparison a batch instead of a call each)."""

        def next_multiple(every: Optional[int]) -> int:
            return (batches // every + 1) * every if every else self.total

        later_rungs = [r for r in self.rungs if r > batches]
        return min(
            self.total,
            next_multiple(self.report_every),
            next_multiple(self.validate_every),
            next_multiple(self.checkpoint_every),
            min(later_rungs, default=self.total),
        )

    def checkpoint_due(self, batches: int) -> bool:
        """A periodic checkpoint (the end, a stop and a better validation bring their own)."""
        return self.checkpoint_every is not None and batches % self.checkpoint_every == 0
