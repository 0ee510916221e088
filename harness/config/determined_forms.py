"""Determined's other spellings of config keys: a command as the entrypoint (a Trainer script, a launch
layer around a trial class, DeepSpeed), given as a string or a list of words; a period of 0 meaning none."""

from __future__ import annotations

from typing import Any, Dict

from harness.errors import HarnessError

PERIOD_KEYS = ("min_validation_period", "min_checkpoint_period")


def normalise(rest: Dict[str, Any]) -> Dict[str, Any]:
    """Determined's other spellings: an entrypoint as a list of words (a command), a period of 0 (none)."""
    entry = rest.get("entrypoint")
    if isinstance(entry, list) and entry and all(isinstance(w, str) for w in entry):
        raise HarnessError(command_entrypoint(" ".join(entry)))
    out = dict(rest)
    for key in PERIOD_KEYS:
        period = rest.get(key)
        if isinstance(period, dict) and len(period) == 1:
            (n,) = period.values()
            if n == 0 and not isinstance(n, bool):
                out[key] = None  # Determined: no periodic validation / checkpoint
    return out


def command_entrypoint(value: str) -> str:
    """Determined's command entrypoints (0.21+): a Trainer script, or a launch layer around a trial class."""
    words = value.split()
    trial = next((w for w in reversed(words) if ":" in w and dotted_name(w.partition(":")[0])), None)
    if "determined.launch.deepspeed" in words:
        return (
            f"config key 'entrypoint' is a command ({value!r}): DeepSpeed trials (DeepSpeedTrial) are not "
            "supported by the harness"
        )
    if "determined.launch.horovod" in words or "determined.launch.torch_distributed" in words:
        if trial:
            return (
                f"config key 'entrypoint' is a command ({value!r}) around the trial class {trial}: run it "
                f"with `harness launch -np N MODEL_DIR --config FILE`, the config's entrypoint set to {trial}"
            )
    script = next((w for w in words if w.endswith(".py")), None)
    if script:
        return (
            f"config key 'entrypoint' is a command ({value!r}): a Determined Trainer script; run it "
            f"as it is with `python {script}` (or `horovodrun -np N python {script}`), not with harness"
        )
    return f"config key 'entrypoint': expected 'module:Class' or a Determined command, got {value!r}"


def dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))
