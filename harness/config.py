"""The experiment config: a schema of dataclasses, defaults, and validation with errors naming the key.

Key names follow Determined's experiment config. To add a key, add a field to the dataclass it belongs in:
`_build` validates types, rejects unknown keys and fills defaults from the field definitions.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import yaml

from harness.errors import HarnessError

LENGTH_UNITS = ("batches", "epochs", "records")
CONFIG_FILE_NAMES = ("experiment.yaml", "const.yaml")

# Determined keys that make sense only on a Determined cluster: say so instead of "unknown key".
_CLUSTER_ONLY_KEYS = {
    "resources": "the number of ranks comes from the launcher (horovodrun -np N)",
    "environment": "the environment is this machine or the container image",
    "bind_mounts": "mount volumes with your container runtime",
    "optimizations": "not supported",
}


@dataclass(frozen=True)
class Length:
    """A training length in Determined's form: ``{batches|epochs|records: N}``."""

    unit: str
    value: int

    def to_batches(self, batches_per_epoch: int, global_batch_size: int) -> int:
        """The length in global batches (optimizer steps)."""
        if self.unit == "batches":
            return self.value
        if self.unit == "epochs":
            return self.value * batches_per_epoch
        return -(-self.value // global_batch_size)  # records, rounded up to whole batches

    def as_dict(self) -> Dict[str, int]:
        return {self.unit: self.value}


@dataclass
class SearcherConfig:
    name: str = "single"
    metric: Optional[str] = None
    smaller_is_better: bool = True
    max_length: Length = field(default_factory=lambda: Length("epochs", 1))


@dataclass
class ReproducibilityConfig:
    experiment_seed: Optional[int] = None  # None: drawn at start and recorded in OUTPUT/config.yaml


@dataclass
class CheckpointStorageConfig:
    save_trial_latest: int = 1  # keep the newest K checkpoints
    save_trial_best: int = 1  # and the best B by searcher.metric


@dataclass
class ExperimentConfig:
    description: str = ""
    name: str = ""
    hyperparameters: Dict[str, Any] = field(default_factory=dict)
    searcher: SearcherConfig = field(default_factory=SearcherConfig)
    min_validation_period: Optional[Length] = None
    scheduling_unit: int = 100
    reproducibility: ReproducibilityConfig = field(default_factory=ReproducibilityConfig)
    data: Dict[str, Any] = field(default_factory=dict)
    entrypoint: Optional[str] = None
    min_checkpoint_period: Optional[Length] = None
    checkpoint_storage: CheckpointStorageConfig = field(default_factory=CheckpointStorageConfig)
    max_restarts: int = 5  # used by `harness launch`

    def as_dict(self) -> Dict[str, Any]:
        """The effective config as plain data (Determined's shape), e.g. to hand to user functions."""
        return _to_plain(self)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, Length):
        return obj.as_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def _build_length(value: Any, key: str) -> Length:
    if not (isinstance(value, dict) and len(value) == 1):
        raise HarnessError(
            f"config key '{key}': expected one of {{batches|epochs|records: N}}, got {value!r}"
        )
    ((unit, n),) = value.items()
    if unit not in LENGTH_UNITS:
        raise HarnessError(f"config key '{key}.{unit}': unknown unit; use one of {', '.join(LENGTH_UNITS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise HarnessError(f"config key '{key}.{unit}': expected a positive integer, got {n!r}")
    return Length(unit, n)


def _build(tp: Any, value: Any, key: str) -> Any:
    """Validate `value` against the annotation `tp`, recursing into dataclasses."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _build(inner, value, key)
    if tp is Length:
        return _build_length(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise HarnessError(f"config key '{key}': expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        for k in value:
            if k not in known:
                where = f"{key}.{k}" if key else str(k)
                hint = _CLUSTER_ONLY_KEYS.get(where)
                if hint:
                    raise HarnessError(
                        f"config key '{where}' is a Determined cluster setting: {hint}; remove it"
                    )
                raise HarnessError(f"unknown config key '{where}' (known: {', '.join(sorted(known))})")
        kwargs = {k: _build(hints[k], v, f"{key}.{k}" if key else k) for k, v in value.items()}
        return tp(**kwargs)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise HarnessError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise HarnessError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
        return value
    raise AssertionError(f"unsupported schema type {tp} for {key}")


def _resolve_hyperparameters(hparams: Dict[str, Any], prefix: str = "hyperparameters") -> Dict[str, Any]:
    """Accept plain values and Determined's ``{type: const, val: x}``, in nested groups too."""
    out: Dict[str, Any] = {}
    for name, spec in hparams.items():
        key = f"{prefix}.{name}"
        if isinstance(spec, dict) and "type" in spec:
            if spec["type"] != "const":
                raise HarnessError(
                    f"config key '{key}': type '{spec['type']}' needs a hyperparameter search; "
                    "this harness trains one trial, use {type: const, val: ...} or a plain value"
                )
            if "val" not in spec:
                raise HarnessError(f"config key '{key}': a const hyperparameter needs 'val'")
            out[name] = spec["val"]
        elif isinstance(spec, dict):
            out[name] = _resolve_hyperparameters(spec, key)  # a nested group, as in Determined
        else:
            out[name] = spec
    return out


def parse_config(raw: Any, source: str = "config") -> ExperimentConfig:
    """Validate a parsed YAML document; errors name `source` and the key."""
    if raw is None:
        raw = {}
    try:
        cfg = _build(ExperimentConfig, raw, "")
        if cfg.scheduling_unit <= 0:
            raise HarnessError("config key 'scheduling_unit': expected a positive integer")
        for key, value in [
            ("max_restarts", cfg.max_restarts),
            ("checkpoint_storage.save_trial_latest", cfg.checkpoint_storage.save_trial_latest),
            ("checkpoint_storage.save_trial_best", cfg.checkpoint_storage.save_trial_best),
        ]:
            if value < 0:
                raise HarnessError(f"config key '{key}': expected a non-negative integer")
        if cfg.checkpoint_storage.save_trial_latest < 1:
            raise HarnessError(
                "config key 'checkpoint_storage.save_trial_latest': keep at least 1 (resume needs it)"
            )
        if cfg.searcher.name != "single":
            raise HarnessError(
                f"config key 'searcher.name': '{cfg.searcher.name}' is a search; this harness runs 'single'"
            )
        if cfg.entrypoint is not None and ":" not in cfg.entrypoint:
            raise HarnessError(f"config key 'entrypoint': expected 'module:Class', got {cfg.entrypoint!r}")
        cfg.hyperparameters = _resolve_hyperparameters(cfg.hyperparameters)
    except HarnessError as e:
        raise HarnessError(f"{source}: {e}") from None
    return cfg


def find_config_file(model_dir: str, explicit: Optional[str] = None) -> Optional[str]:
    """`--config FILE` if given, else experiment.yaml or const.yaml in the model directory, else None."""
    if explicit:
        if not os.path.isfile(explicit):
            raise HarnessError(f"config file {explicit} does not exist")
        return explicit
    for name in CONFIG_FILE_NAMES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path
    return None


def load_config(path: Optional[str]) -> ExperimentConfig:
    """Load and validate a YAML config file (safe loader); None gives the defaults."""
    if path is None:
        return parse_config({}, "defaults")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise HarnessError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise HarnessError(f"{path}: expected a mapping of config keys at the top level")
    return parse_config(raw, path)


def load_for_model(model_def: str, explicit: Optional[str] = None) -> ExperimentConfig:
    """The config of a model definition (a folder or its main .py): `--config`, or the one beside it."""
    directory = os.path.dirname(model_def) if os.path.isfile(model_def) else model_def
    return load_config(find_config_file(directory, explicit))
