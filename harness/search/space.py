"""A search config (PEDL/Determined `searcher` and typed `hyperparameters`): parsed, checked, and turned into
one trial's plain config.

Hyperparameter types: `const` (val), `int` / `double` (minval, maxval, count for grid), `log` (base, exponents
minval / maxval, count for grid), `categorical` (vals); nested groups. Searchers: single, random, grid,
adaptive_asha with its older names adaptive_simple / adaptive.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from harness.errors import HarnessError

ADAPTIVE = ("adaptive_asha", "adaptive_simple", "adaptive")
# Determined's halving searchers: ASHA with one bracket of num_rungs rungs (sync_halving's synchronous
# halving runs asynchronously here, with a warning).
HALVING = ("async_halving", "sync_halving")
SEARCHERS = ("single", "random", "grid") + ADAPTIVE + HALVING
UNSUPPORTED = ("pbt", "custom")
MODES = ("aggressive", "standard", "conservative")
TYPES = ("const", "int", "double", "log", "categorical")
# Searcher keys that describe the search, not one trial (left out of each trial's config).
_SEARCH_KEYS = {
    "random": ("max_trials", "max_concurrent_trials"),
    "grid": ("max_concurrent_trials",),
    "adaptive": (
        "max_trials",
        "divisor",
        "max_rungs",
        "mode",
        "max_concurrent_trials",
        "bracket_rungs",
        "stop_once",
        "target_trial_steps",
        "step_budget",
        "train_stragglers",
        "num_rungs",
        "budget",
    ),
}
# Keys Determined's adaptive searchers had that ASHA here has no use for: accepted with one warning each.
_NO_EFFECT = {
    "bracket_rungs": "the brackets follow searcher.mode",
    "train_stragglers": "trials behind a rung are stopped, not trained on",
}


@dataclass
class Param:
    """One searched hyperparameter; `path` is its place in the (nested) hyperparameters."""

    path: Tuple[str, ...]
    kind: str
    spec: Dict[str, Any]

    @property
    def name(self) -> str:
        return ".".join(self.path)

    def suggest(self, trial: Any) -> Any:
        """The value for an Optuna trial (its sampler decides)."""
        s = self.spec
        if self.kind == "int":
            return trial.suggest_int(self.name, s["minval"], s["maxval"])
        if self.kind == "double":
            return trial.suggest_float(self.name, s["minval"], s["maxval"])
        if self.kind == "log":  # the exponent is sampled uniformly, as in Determined
            return s.get("base", 10.0) ** trial.suggest_float(self.name, s["minval"], s["maxval"])
        vals = s["vals"]
        if _plain(vals):  # Optuna's own choices; other values (lists, mappings) are chosen by index
            return trial.suggest_categorical(self.name, vals)
        return copy.deepcopy(vals[trial.suggest_categorical(self.name, list(range(len(vals))))])

    def example(self) -> Any:
        """A value of the right type, to check the rest of the config before any trial runs."""
        s = self.spec
        if self.kind == "categorical":
            return s["vals"][0]
        return s.get("base", 10.0) ** s["minval"] if self.kind == "log" else s["minval"]

    def grid(self) -> List[Any]:
        """The values Optuna's grid sampler offers for this parameter (exponents for `log`)."""
        s = self.spec
        if self.kind == "categorical":
            return list(s["vals"]) if _plain(s["vals"]) else list(range(len(s["vals"])))
        lo, hi, count = s["minval"], s["maxval"], s["count"]
        if self.kind == "int":
            count = min(count, hi - lo + 1)
            if count == 1:
                return [int(round((lo + hi) / 2))]
            return sorted({int(round(lo + i * (hi - lo) / (count - 1))) for i in range(count)})
        if count == 1:
            return [(lo + hi) / 2]
        return [lo + i * (hi - lo) / (count - 1) for i in range(count)]


def _plain(vals: List[Any]) -> bool:
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in vals) and _distinct(vals)


def _distinct(vals: List[Any]) -> bool:
    return len({(type(v), v) for v in vals}) == len(vals)


@dataclass
class SearchSpec:
    """A parsed search: the searcher's fields, the searched parameters, and the config every trial shares."""

    name: str
    metric: str
    smaller_is_better: bool
    params: List[Param]
    raw: Dict[str, Any]  # the config without the search-only searcher keys
    max_trials: int = 1
    max_concurrent_trials: int = 0  # 0: no limit beyond --parallel
    divisor: int = 4
    max_rungs: int = 5
    mode: str = "standard"
    seed: Optional[int] = None
    source: str = ""  # the config as read (JSON), to recognise the same search when it is run again
    warnings: List[str] = field(default_factory=list)  # searcher keys accepted without effect

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE + HALVING

    def grid_space(self) -> Dict[str, List[Any]]:
        return {p.name: p.grid() for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid_space().values()) if self.params else 1

    def total_trials(self) -> int:
        return self.grid_size() if self.name == "grid" else self.max_trials

    def pruning(self) -> Optional[Dict[str, Any]]:
        """What a trial needs to build the pruner (None: no early stopping)."""
        if not self.adaptive:
            return None
        return {"divisor": self.divisor, "max_rungs": self.max_rungs, "mode": self.mode}

    def trial_config(self, values: Dict[str, Any], seed: Optional[int]) -> Dict[str, Any]:
        """One trial's plain config: every hyperparameter a constant, searcher `single`, its own seed."""
        raw = copy.deepcopy(self.raw)
        hparams = raw.setdefault("hyperparameters", {})
        for p in self.params:
            group = hparams
            for part in p.path[:-1]:
                group = group[part]
            group[p.path[-1]] = values[p.name]
        raw["searcher"]["name"] = "single"
        if seed is not None:
            raw["reproducibility"] = dict(raw.get("reproducibility") or {}, experiment_seed=seed)
        return raw

    def trial_hparams(self, trial: Any) -> Dict[str, Any]:
        """Sample (or, for a trial that has them, read back) every searched value of an Optuna trial."""
        return {p.name: p.suggest(trial) for p in self.params}


def _check_number(key: str, spec: Dict[str, Any], name: str, integer: bool) -> None:
    value = spec[name]
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        kind = "an integer" if integer else "a number"
        raise HarnessError(f"config key '{key}.{name}': expected {kind}, got {value!r}")


def _check_param(key: str, spec: Dict[str, Any], grid: bool) -> str:
    kind = spec["type"]
    if kind not in TYPES:
        raise HarnessError(f"config key '{key}.type': unknown type {kind!r} (known: {', '.join(TYPES)})")
    needs = {"const": ("val",), "categorical": ("vals",)}.get(kind, ("minval", "maxval"))
    missing = [n for n in needs if n not in spec]
    if missing:
        needed = " and ".join(repr(m) for m in missing)
        raise HarnessError(f"config key '{key}': type '{kind}' needs {needed}")
    if kind == "categorical":
        if not isinstance(spec["vals"], list) or not spec["vals"]:
            raise HarnessError(f"config key '{key}.vals': expected a non-empty list, got {spec['vals']!r}")
    elif kind in ("int", "double", "log"):
        for n in ("minval", "maxval"):
            _check_number(key, spec, n, integer=kind == "int")
        if spec["minval"] > spec["maxval"]:
            raise HarnessError(
                f"config key '{key}': minval {spec['minval']} is greater than maxval {spec['maxval']}"
            )
        if kind == "log":
            base = spec.get("base", 10.0)
            if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0 or base == 1:
                raise HarnessError(f"config key '{key}.base': expected a positive number other than 1")
        if grid and "count" not in spec:
            raise HarnessError(f"config key '{key}': the grid searcher needs 'count' for type '{kind}'")
        if "count" in spec:
            _check_number(key, spec, "count", integer=True)
            if spec["count"] < 1:
                raise HarnessError(f"config key '{key}.count': expected a positive integer")
    return kind


def _params(hparams: Dict[str, Any], path: Tuple[str, ...], grid: bool) -> List[Param]:
    """The searched parameters of a hyperparameters section (nested groups included), checked."""
    out: List[Param] = []
    for name, spec in hparams.items():
        key = "hyperparameters." + ".".join(path + (str(name),))
        if isinstance(spec, dict) and "type" in spec:
            kind = _check_param(key, spec, grid)
            if kind != "const":
                out.append(Param(path + (name,), kind, spec))
        elif isinstance(spec, dict):
            out.extend(_params(spec, path + (name,), grid))
    return out


def _positive(searcher: Dict[str, Any], key: str, default: Optional[int], minimum: int = 1) -> int:
    value = searcher.get(key)
    if value is None:  # absent, or null (Determined's "the default")
        value = default
    if isinstance(value, float) and value.is_integer():  # Determined's schema: a number (divisor: 4.0)
        value = int(value)
    if value is None:
        raise HarnessError(f"config key 'searcher.{key}': required by searcher '{searcher['name']}'")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HarnessError(f"config key 'searcher.{key}': expected an integer >= {minimum}, got {value!r}")
    return value


def _length_budget(searcher: Dict[str, Any]) -> None:
    """Determined's adaptive (0.13+): `budget` and `max_length` in the same unit: budget / max_length
    trials of max_length."""
    budget, length = searcher.get("budget"), searcher.get("max_length")
    if not (isinstance(budget, dict) and isinstance(length, dict) and len(budget) == len(length) == 1):
        return
    (unit, total), (unit2, each) = next(iter(budget.items())), next(iter(length.items()))
    if unit != unit2:
        raise HarnessError(
            f"config key 'searcher.budget': in {unit}, but searcher.max_length is in {unit2}; use one unit"
        )
    if isinstance(total, int) and isinstance(each, int) and 0 < each <= total:
        searcher["max_trials"] = total // each


def _from_budget(searcher: Dict[str, Any]) -> None:
    """PEDL's first adaptive searcher gave a budget: `target_trial_steps` (a full trial's length) and
    `step_budget` (steps in all). Here: step_budget / target_trial_steps trials of target_trial_steps."""
    target, budget = searcher.get("target_trial_steps"), searcher.get("step_budget")
    if not (isinstance(target, int) and isinstance(budget, int)) or target < 1 or budget < target:
        return  # max_trials' own error says what is missing
    if "max_length" not in searcher and "max_steps" not in searcher:
        searcher["max_steps"] = target
    searcher["max_trials"] = budget // target


def _halving(name: str, searcher: Dict[str, Any]) -> List[str]:
    """async_halving / sync_halving as ASHA: one bracket (aggressive) of num_rungs rungs."""
    rungs = _positive(searcher, "num_rungs", None)
    searcher["max_rungs"], searcher["mode"] = rungs, "aggressive"
    if name == "sync_halving":
        return ["searcher sync_halving runs as asynchronous halving here (ASHA with one bracket)"]
    return []


def parse_search(raw: Any, source: str = "config") -> SearchSpec:
    """Check a search config; errors are one line naming `source` and the key."""
    try:
        return _parse(raw)
    except HarnessError as e:
        raise HarnessError(f"{source}: {e}") from None


def _parse(raw: Any) -> SearchSpec:
    if not isinstance(raw, dict):
        raise HarnessError(f"expected a mapping of config keys at the top level, got {raw!r}")
    searcher = raw.get("searcher")
    if not isinstance(searcher, dict):
        raise HarnessError("config key 'searcher': a search needs a searcher section (name, metric, ...)")
    searcher = dict(searcher)
    name = searcher.setdefault("name", "single")
    if name in UNSUPPORTED:
        raise HarnessError(f"config key 'searcher.name': searcher '{name}' is not supported (use one of "
                           f"{', '.join(SEARCHERS)})")  # fmt: skip
    if name not in SEARCHERS:
        known = ", ".join(SEARCHERS)
        raise HarnessError(f"config key 'searcher.name': unknown searcher {name!r} (known: {known})")
    metric = searcher.get("metric")
    if not isinstance(metric, str) or not metric:
        raise HarnessError("config key 'searcher.metric': a search compares trials by this validation metric")
    hparams = raw.get("hyperparameters") or {}
    if not isinstance(hparams, dict):
        raise HarnessError(f"config key 'hyperparameters': expected a mapping, got {hparams!r}")
    params = _params(hparams, (), grid=name == "grid")
    seed = (raw.get("reproducibility") or {}).get("experiment_seed")
    if searcher.get("smaller_is_better", True) is None:  # null: Determined's default
        searcher["smaller_is_better"] = True
    spec = SearchSpec(name, metric, bool(searcher.get("smaller_is_better", True)), params, {}, seed=seed)
    family = "adaptive" if name in ADAPTIVE + HALVING else name
    if name == "single" and params:
        raise HarnessError(
            f"config key 'hyperparameters.{params[0].name}': searcher 'single' trains one trial: give one "
            "value (type const), or choose searcher random, grid or adaptive_asha"
        )
    if name in ("adaptive", "sync_halving") and searcher.get("max_trials") is None:
        _from_budget(searcher)
        _length_budget(searcher)
    target = searcher.get("target_trial_steps")  # 0.12's trial length, for every adaptive searcher
    if isinstance(target, int) and "max_length" not in searcher and "max_steps" not in searcher:
        searcher["max_steps"] = target
    if name in HALVING:  # one bracket of num_rungs rungs: ASHA's aggressive mode
        spec.warnings += _halving(name, searcher)
    for key in ("max_time", "time_metric"):
        if key in searcher:
            raise HarnessError(
                f"config key 'searcher.{key}': Determined 0.38's time budget is not supported here; "
                "give searcher.max_length"
            )
    for key, why in _NO_EFFECT.items():
        if searcher.get(key) not in (None, []):
            spec.warnings.append(f"searcher.{key} has no effect here ({why})")
    if searcher.get("stop_once") is False:
        spec.warnings.append(
            "searcher.stop_once: false has no effect here (a trial behind a rung stops for good)"
        )
    if name in ("random",) + ADAPTIVE + HALVING:
        spec.max_trials = _positive(searcher, "max_trials", None)
    if "max_concurrent_trials" in searcher:
        spec.max_concurrent_trials = _positive(searcher, "max_concurrent_trials", 0, minimum=0)
    if name in ADAPTIVE + HALVING:
        spec.divisor = _positive(searcher, "divisor", 4, minimum=2)
        spec.max_rungs = _positive(searcher, "max_rungs", 5)
        spec.mode = searcher.get("mode") or "standard"
        if spec.mode not in MODES:
            modes = ", ".join(MODES)
            raise HarnessError(f"config key 'searcher.mode': expected one of {modes}, got {spec.mode!r}")
    for key in _SEARCH_KEYS.get(family, ()):
        searcher.pop(key, None)
    spec.raw = dict(copy.deepcopy(raw), searcher=searcher)
    return spec
