"""PEDL/Determined config keys that only meant something on the cluster: accepted, so that a PEDL config
loads unchanged, and named in one warning with the reason each is ignored here."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from harness.errors import HarnessError

# PEDL/Determined keys that only meant something on the cluster. They are accepted (a PEDL config loads
# unchanged) and listed in one warning with the reason; the value is why the key is ignored here.
CLUSTER_KEYS: Dict[str, str] = {
    "resources": "ranks come from the launcher",
    "environment": "this machine's environment is used",
    "bind_mounts": "mount volumes yourself",
    "data_layer": "data is read directly",
    "tensorboard_storage": "TensorBoard files go to --output",
    **dict.fromkeys(("security", "internal", "debug", "profiling"), "cluster-only"),
    **dict.fromkeys(("labels", "workspace", "project"), "cluster bookkeeping"),
    "records_per_epoch": "the epoch length comes from the data loader",
}
CLUSTER_SUBKEYS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "checkpoint_storage": (
        ("type", "host_path", "storage_path", "container_path", "propagation", "bucket", "access_key")
        + ("secret_key", "endpoint_url", "prefix", "hdfs_url", "hdfs_path", "user", "save_experiment_best"),
        "checkpoints go to --output",
    ),
    "searcher": (("source_trial_id", "source_checkpoint_uuid"), "start from a checkpoint with --resume"),
}


def split_ignored(raw: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Take the cluster keys out of `raw` (not modified): (the rest, ignored values by dotted key)."""
    rest = dict(raw)
    ignored: Dict[str, Any] = {}
    for key in raw:
        if key in CLUSTER_KEYS:
            ignored[key] = rest.pop(key)
        elif key in CLUSTER_SUBKEYS and isinstance(raw[key], dict):
            subkeys, _ = CLUSTER_SUBKEYS[key]
            section = rest[key] = dict(raw[key])
            for sub in raw[key]:
                if sub in subkeys:
                    ignored[f"{key}.{sub}"] = section.pop(sub)
    return rest, ignored


def ignored_warning(ignored: Dict[str, Any]) -> str:
    """``resources (why), checkpoint_storage.type/host_path (why)``: keys grouped by their reason."""
    by_reason: Dict[str, List[str]] = {}
    for dotted in ignored:
        section, _, sub = dotted.partition(".")
        reason = CLUSTER_SUBKEYS[section][1] if sub else CLUSTER_KEYS[section]
        by_reason.setdefault(reason, []).append(dotted)
    parts = []
    for reason, keys in by_reason.items():
        names: List[str] = []
        previous = None
        for dotted in keys:  # name a section once: checkpoint_storage.type/host_path
            section, _, sub = dotted.partition(".")
            names.append(sub if sub and section == previous else dotted)
            previous = section if sub else None
        parts.append(f"{'/'.join(names)} ({reason})")
    return "ignoring cluster settings: " + ", ".join(parts)


def slots_per_trial(resources: Any) -> Optional[int]:
    """resources.slots_per_trial, which the loop checks against the number of ranks."""
    if resources is None:
        return None
    if not isinstance(resources, dict):
        raise HarnessError(f"config key 'resources': expected a mapping, got {resources!r}")
    slots = resources.get("slots_per_trial")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 0):
        raise HarnessError(f"config key 'resources.slots_per_trial': expected an integer >= 0, got {slots!r}")
    return slots
