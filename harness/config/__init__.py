"""The experiment config: a schema of dataclasses, defaults, and validation with errors naming the key.

Key names follow Determined's experiment config. To add a key, add a field to the dataclass it belongs in:
`_build` validates types, rejects unknown keys and fills defaults from the field definitions.
PEDL-era configs load unchanged: steps (`max_steps`, integer periods) are converted with
`batches_per_step`, and keys that only meant something on the cluster are ignored with one warning.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from harness.config import cluster_keys, determined_forms, optimizations
from harness.config.optimizations import OptimizationsConfig, TrainingOptions
from harness.config.yaml12 import load_yaml_file
from harness.errors import HarnessError, check_model_path

LENGTH_UNITS = ("batches", "epochs", "records")
CONFIG_FILE_NAMES = ("experiment.yaml", "const.yaml")

CHECKPOINT_POLICIES = ("best", "all", "none")
SEARCHERS = ("single", "random", "grid", "adaptive", "adaptive_simple", "adaptive_asha", "pbt", "custom")
HPARAM_SEARCH_TYPES = ("int", "double", "log", "categorical")
_STEP_PERIOD_KEYS = determined_forms.PERIOD_KEYS
_STEPS = "steps"  # parse-time unit of an integer period, converted to batches once batches_per_step is known

_SEARCH_ADVICE = (
    "is a hyperparameter search: run it with `harness search MODEL_DIR --config FILE --output OUT` "
    "(to train one trial, use searcher.name: single with one value per hyperparameter)"
)

# Field metadata: "internal" fields are set by parse_config, never read from YAML nor written by as_dict;
# "input_only" fields are read from YAML but folded into others, so as_dict leaves them out.
_INTERNAL = {"internal": True}
_INPUT_ONLY = {"input_only": True}


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
    max_steps: Optional[int] = field(default=None, metadata=_INPUT_ONLY)  # PEDL: × batches_per_step


@dataclass
class ReproducibilityConfig:
    experiment_seed: Optional[int] = None  # None: drawn at start and recorded in OUTPUT/config.yaml


@dataclass
class CheckpointStorageConfig:
    save_trial_latest: int = 1  # keep the newest K checkpoints
    save_trial_best: int = 1  # and the best B by searcher.metric


@dataclass
class EntrypointsConfig:
    """PEDL v0.11's ``entrypoints:`` section: where the trial class and the data functions are.

    Each value is ``module:name``, the module a file of the model definition (``data``,
    ``model_def_multi_output``, ``sub.module``); a key left out is found as without the section (the order
    is in harness/definition.py).
    """

    trial_class: Optional[str] = None
    data_loaders_function: Optional[str] = None
    download_data_function: Optional[str] = None


@dataclass
class ExperimentConfig:
    description: str = ""
    name: str = ""
    hyperparameters: Dict[str, Any] = field(default_factory=dict)
    searcher: SearcherConfig = field(default_factory=SearcherConfig)
    min_validation_period: Optional[Length] = None  # an integer counts steps (PEDL)
    batches_per_step: int = 100  # PEDL's step: the unit of max_steps and of integer periods
    scheduling_unit: int = 100  # batches per report; defaults to batches_per_step
    reproducibility: ReproducibilityConfig = field(default_factory=ReproducibilityConfig)
    data: Dict[str, Any] = field(default_factory=dict)
    entrypoint: Optional[str] = None  # Determined's 'module:Class'
    entrypoints: Optional[EntrypointsConfig] = None  # PEDL v0.11's trial class and data functions
    min_checkpoint_period: Optional[Length] = None  # an integer counts steps (PEDL)
    perform_initial_validation: bool = False  # Determined's: validate before the first batch too
    checkpoint_storage: CheckpointStorageConfig = field(default_factory=CheckpointStorageConfig)
    checkpoint_policy: str = "best"  # extra checkpoints after validations: best | all | none
    stall_timeout: int = 600  # seconds without progress on a rank before the job ends (watchdog.py)
    setup_timeout: int = 600  # the same for set-up (model, optimizer, data loaders), before the first batch
    download_timeout: int = 3600  # the same for download_data(), which may take longer
    max_restarts: int = 5  # used by `harness launch`
    optimizations: OptimizationsConfig = field(default_factory=optimizations.defaults)
    # Set by parse_config. Equality means "trains the same", so what was ignored and said about it is
    # left out of it; slots_per_trial is not (the loop checks it against the launcher's ranks).
    slots_per_trial: Optional[int] = field(default=None, metadata=_INTERNAL)  # resources.slots_per_trial
    warnings: List[str] = field(default_factory=list, compare=False, metadata=_INTERNAL)
    ignored: Dict[str, Any] = field(default_factory=dict, compare=False, metadata=_INTERNAL)

    def as_dict(self) -> Dict[str, Any]:
        """The effective config as plain data (Determined's shape), e.g. to hand to user functions.

        Ignored top-level sections are included verbatim: PEDL code may read ``config["resources"]``.
        """
        plain = _to_plain(self)
        plain.update({k: copy.deepcopy(v) for k, v in self.ignored.items() if "." not in k})
        return plain

    @property
    def training_options(self) -> TrainingOptions:
        """Aggregation, precision, clipping, compression: both spellings resolved (parse_config)."""
        return optimizations.training_options(self.optimizations)


def _schema_fields(tp: Any) -> List[dataclasses.Field]:
    """The fields a YAML config may set."""
    return [f for f in dataclasses.fields(tp) if not f.metadata.get("internal")]


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, Length):
        return obj.as_dict()
    if dataclasses.is_dataclass(obj):
        fields = [f for f in _schema_fields(obj) if not f.metadata.get("input_only")]
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def _build_length(value: Any, key: str) -> Length:
    if key in _STEP_PERIOD_KEYS and isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise HarnessError(f"config key '{key}': expected a positive number of steps, got {value}")
        return Length(_STEPS, value)
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
        known = {f.name for f in _schema_fields(tp)}
        for k in value:
            if k not in known:
                where = f"{key}.{k}" if key else str(k)
                hint = _did_you_mean(k, key, known)
                raise HarnessError(f"unknown config key '{where}' (known: {', '.join(sorted(known))}){hint}")
        kwargs = {k: _build(hints[k], v, f"{key}.{k}" if key else k) for k, v in value.items()}
        return typing.cast(Any, tp)(**kwargs)
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


def _did_you_mean(name: Any, section: str, known: Any) -> str:
    """A typo of a schema key or of an ignored cluster key (`resorces`) gets a suggestion."""
    candidates = set(known)
    if not section:
        candidates |= set(cluster_keys.CLUSTER_KEYS)
    candidates |= set(cluster_keys.CLUSTER_SUBKEYS.get(section, ((), ""))[0])
    close = difflib.get_close_matches(str(name), sorted(candidates), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _resolve_hyperparameters(hparams: Dict[str, Any], prefix: str = "hyperparameters") -> Dict[str, Any]:
    """Accept plain values and Determined's ``{type: const, val: x}``, in nested groups too."""
    out: Dict[str, Any] = {}
    for name, spec in hparams.items():
        key = f"{prefix}.{name}"
        if isinstance(spec, dict) and "type" in spec:
            if spec["type"] in HPARAM_SEARCH_TYPES:
                raise HarnessError(f"config key '{key}': type '{spec['type']}' {_SEARCH_ADVICE}")
            if spec["type"] != "const":
                known = ", ".join(("const",) + HPARAM_SEARCH_TYPES)
                raise HarnessError(f"config key '{key}': unknown type {spec['type']!r} (known: {known})")
            if "val" not in spec:
                raise HarnessError(f"config key '{key}': a const hyperparameter needs 'val'")
            out[name] = spec["val"]
        elif isinstance(spec, dict):
            out[name] = _resolve_hyperparameters(spec, key)  # a nested group, as in Determined
        else:
            out[name] = spec
    return out


def _refuse_search(raw: Dict[str, Any]) -> None:
    """Say what to run instead, before a search searcher's own keys (max_trials...) read as unknown."""
    searcher = raw.get("searcher")
    name = searcher.get("name", "single") if isinstance(searcher, dict) else "single"
    if name == "single" or not isinstance(name, str):
        return  # a non-string name gets _build's type error
    if name in SEARCHERS:
        raise HarnessError(f"config key 'searcher.name': '{name}' {_SEARCH_ADVICE}")
    known = ", ".join(s for s in SEARCHERS if s not in ("pbt", "custom"))
    raise HarnessError(f"config key 'searcher.name': unknown searcher {name!r} (known: {known})")


def _resolve_steps(cfg: ExperimentConfig, raw: Dict[str, Any]) -> None:
    """PEDL counted in steps of `batches_per_step` batches: convert to batches; default scheduling_unit."""
    bps = cfg.batches_per_step
    if bps <= 0:
        raise HarnessError(f"config key 'batches_per_step': expected a positive integer, got {bps}")
    if "scheduling_unit" not in raw:
        cfg.scheduling_unit = bps  # report every step, as PEDL did
    for key in _STEP_PERIOD_KEYS:
        period = getattr(cfg, key)
        if period is not None and period.unit == _STEPS:
            setattr(cfg, key, Length("batches", period.value * bps))
    steps = cfg.searcher.max_steps
    if steps is not None:
        if "max_length" in raw.get("searcher", {}):
            raise HarnessError(
                "config keys 'searcher.max_steps' and 'searcher.max_length' both give the training length; "
                "keep one"
            )
        if steps <= 0:
            raise HarnessError(f"config key 'searcher.max_steps': expected a positive integer, got {steps}")
        cfg.searcher.max_length = Length("batches", steps * bps)
        cfg.searcher.max_steps = None  # folded into max_length, the one effective length


SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit: a larger one would wrap (-1 and 2**32-1 trained alike)


def _validate(cfg: ExperimentConfig) -> None:
    seed = cfg.reproducibility.experiment_seed
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise HarnessError(
            "config key 'reproducibility.experiment_seed': "
            f"expected an integer from 0 to {SEED_MAX}, got {seed}"
        )
    for key in ("scheduling_unit", "stall_timeout", "setup_timeout", "download_timeout"):
        if getattr(cfg, key) <= 0:
            raise HarnessError(f"config key '{key}': expected a positive integer")
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
    if cfg.checkpoint_policy not in CHECKPOINT_POLICIES:
        raise HarnessError(
            f"config key 'checkpoint_policy': expected one of {', '.join(CHECKPOINT_POLICIES)}, "
            f"got {cfg.checkpoint_policy!r}"
        )
    _check_entrypoint("entrypoint", cfg.entrypoint, "module:Class")
    if cfg.entrypoints is not None:
        for f in dataclasses.fields(cfg.entrypoints):
            _check_entrypoint(f"entrypoints.{f.name}", getattr(cfg.entrypoints, f.name), "module:name")
        if cfg.entrypoint is not None and cfg.entrypoints.trial_class is not None:
            raise HarnessError(
                "config keys 'entrypoint' and 'entrypoints.trial_class' both name the trial class; keep one"
            )


def _check_entrypoint(key: str, value: Optional[str], form: str) -> None:
    if key == "entrypoint" and isinstance(value, str) and len(value.split()) > 1:
        raise HarnessError(determined_forms.command_entrypoint(value))
    module, _, name = (value or "").partition(":")
    if value is not None and not (determined_forms.dotted_name(module) and name.isidentifier()):
        raise HarnessError(f"config key '{key}': expected '{form}', got {value!r}")


def parse_config(raw: Any, source: str = "config") -> ExperimentConfig:
    """Validate a parsed YAML document; errors name `source` and the key, warnings go to `cfg.warnings`."""
    if raw is None:
        raw = {}
    try:
        if not isinstance(raw, dict):
            raise HarnessError(f"expected a mapping of config keys at the top level, got {raw!r}")
        _refuse_search(raw)
        rest, ignored = cluster_keys.split_ignored(raw)
        rest = determined_forms.normalise(rest)
        cfg = _build(ExperimentConfig, rest, "")
        _resolve_steps(cfg, rest)
        _validate(cfg)
        cfg.hyperparameters = _resolve_hyperparameters(cfg.hyperparameters)
        block = cfg.optimizations if "optimizations" in rest else OptimizationsConfig()
        cfg.optimizations = optimizations.merge(block, cfg.hyperparameters)
        cfg.slots_per_trial = cluster_keys.slots_per_trial(ignored.get("resources"))
    except HarnessError as e:
        raise HarnessError(f"{source}: {e}") from None
    cfg.ignored = ignored
    if ignored:
        cfg.warnings = [f"{source}: {cluster_keys.ignored_warning(ignored)}"]
    cfg.warnings += [f"{source}: {line}" for line in optimizations.notes(cfg.optimizations)]
    return cfg


def find_config_file(model_dir: str, explicit: Optional[str] = None) -> Optional[str]:
    """`--config FILE` if given, else experiment.yaml or const.yaml in the model directory, else None."""
    if explicit:  # a file, or a pipe such as --config <(...) in one process
        if os.path.isdir(explicit):
            raise HarnessError(f"config file {explicit} is a directory, not a YAML file")
        if not os.path.exists(explicit):
            pipe = explicit.startswith(("/dev/fd/", "/proc/self/fd/"))
            hint = (
                "; a pipe such as <(...) reaches one process only: under a launcher use a file"
                if pipe
                else ""
            )
            raise HarnessError(f"config file {explicit} does not exist{hint}")
        return explicit
    for name in CONFIG_FILE_NAMES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path
    return None


def load_config(path: Optional[str]) -> ExperimentConfig:
    """Load and validate a YAML config file; None gives the defaults.

    The file is read by load_yaml_file: safe loader, no anchors or aliases, at most 1 MB, 32 levels deep,
    no duplicate keys, UTF-8 text.
    """
    if path is None:
        return parse_config({}, "defaults")
    numeric_strings: List[str] = []
    raw = load_yaml_file(path, numeric_strings)
    if raw is not None and not isinstance(raw, dict):
        raise HarnessError(f"{path}: expected a mapping of config keys at the top level")
    cfg = parse_config(raw, path)
    cfg.warnings[:0] = numeric_strings
    return cfg


def load_for_model(model_def: str, explicit: Optional[str] = None) -> ExperimentConfig:
    """The config of a model definition (a folder or its main .py): `--config`, or the one beside it."""
    check_model_path(model_def)
    directory = os.path.dirname(model_def) if os.path.isfile(model_def) else model_def
    path = find_config_file(directory, explicit)
    if path is None:
        names = " or ".join(CONFIG_FILE_NAMES)
        raise HarnessError(
            f"no experiment config: {os.path.abspath(directory)} holds no {names}; write one there "
            "(hyperparameters, searcher.max_length, ...) or pass --config FILE"
        )
    return load_config(path)
