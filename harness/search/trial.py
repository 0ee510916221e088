"""The trial's side of a search: rank 0 reports each validation's searcher metric to the study and learns
whether to stop early; every rank learns it by one broadcast, so all stop at the same batch.

`harness search` starts each trial with `--search-trial FILE`; FILE (JSON) names the study, the trial and the
pruner's settings. Without it `connect` returns a searcher that never stops training.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional

if TYPE_CHECKING:
    from harness.distributed.backend import Backend

STOPPED_EARLY = "harness:stopped_early_at"  # the trial's user attribute: the batch it stopped at


class NoSearch:
    """Training outside a search."""

    rungs: FrozenSet[int] = frozenset()  # batches at which the search wants a validation: none

    def should_stop(self, batches: int, metrics: Dict[str, Any]) -> bool:
        return False

    def stopped(self, batches: int) -> None:
        pass


def _first_rung(total: int, divisor: int, max_rungs: int) -> int:
    """ASHA's min_resource in batches: total / divisor**(max_rungs-1), whole and at least 1."""
    return max(1, total // divisor ** (max_rungs - 1))


def rungs(total: int, divisor: int, max_rungs: int) -> List[int]:
    """The batches at which a trial of `total` batches meets a rung: min_resource * divisor**k < total."""
    first = _first_rung(total, divisor, max_rungs)
    return [first * divisor**k for k in range(max_rungs) if first * divisor**k < total]


def make_pruner(pruning: Optional[Dict[str, Any]], total: int) -> Any:
    """Optuna's ASHA for Determined's modes: aggressive is one bracket (successive halving); standard and
    conservative are Hyperband over the upper half of, or all, the brackets (Determined's bracket rungs)."""
    import optuna

    if not pruning:
        return optuna.pruners.NopPruner()
    divisor, max_rungs = pruning["divisor"], pruning["max_rungs"]
    first = _first_rung(total, divisor, max_rungs)
    brackets = {"aggressive": 1, "standard": max_rungs - (max_rungs - 1) // 2, "conservative": max_rungs}
    count = brackets[pruning["mode"]]
    if count == 1:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=divisor)
    return optuna.pruners.HyperbandPruner(
        min_resource=first, max_resource=first * divisor ** (count - 1), reduction_factor=divisor
    )


class StudyTrial:
    """Rank 0's link to the study (other ranks hold one too, without a connection)."""

    def __init__(self, info: Dict[str, Any], backend: Backend, total: int):
        self.info, self.backend, self.total = info, backend, total
        self.metric = info["metric"]
        pruning = info.get("pruning")
        self.rungs = frozenset(rungs(total, pruning["divisor"], pruning["max_rungs"]) if pruning else ())
        self.trial = None
        if backend.rank == 0:
            from harness.search import study as search_study

            study = search_study.load(info["storage"], info["study"], make_pruner(pruning, total))
            self.trial = search_study.trial(study, info["number"])

    def should_stop(self, batches: int, metrics: Dict[str, Any]) -> bool:
        stop = False
        if self.trial is not None:
            value = metrics.get(self.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.trial.report(float(value), batches)
                stop = batches < self.total and self.trial.should_prune()
        if self.backend.size > 1:
            stop = bool(self.backend.broadcast_object(stop))
        return stop

    def stopped(self, batches: int) -> None:
        """After the checkpoint: the search reads this and records the trial as stopped early."""
        if self.trial is not None:
            self.trial.set_user_attr(STOPPED_EARLY, batches)


def connect(path: Optional[str], backend: Backend, total: int) -> Any:
    if not path:
        return NoSearch()
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    return StudyTrial(info, backend, total)
