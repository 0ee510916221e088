"""Checkpoints: atomic save by rank 0, verified load (weights_only), retention, and RNG capture.

Layout: ``OUTPUT/checkpoints/<batches>/`` holding ``model.pt``, ``optimizer.pt``, ``trainer.pt`` (RNG states
of every rank, partial training metrics), ``state.json`` (progress, config, hparams, metrics) and
``manifest.json`` (sha256 of each file), plus ``OUTPUT/checkpoints/latest`` naming the newest one.
A checkpoint is written into a temporary folder, fsynced and renamed, so it is complete or absent.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, cast

import numpy as np
import torch

from harness.errors import HarnessError, describe, say
from harness.output import reports
from harness.output.reports import checkpoint_dirs  # noqa: F401 - here too, where callers look for it

MANIFEST = "manifest.json"
STATE = "state.json"
TENSOR_FILES = ("model.pt", "optimizer.pt", "trainer.pt")


@dataclass
class Checkpoint:
    path: str
    state: Dict[str, Any]  # state.json: progress, metrics, config, hparams
    model: Dict[str, Any]
    optimizer: Dict[str, Any]
    trainer: Dict[str, Any]  # rng (per rank), training-metric window


def capture_rng(torch_only: bool = False) -> Dict[str, Any]:
    """This process's RNG states, as data that ``torch.load(weights_only=True)`` accepts.

    `torch_only`: just torch's CPU generator, all that a DataLoader's ``iter()`` draws from (cheap enough
    to take at every epoch start).
    """
    if torch_only:
        return {"torch": torch.get_rng_state()}
    np_state = cast(Tuple[Any, ...], np.random.get_state(legacy=True))  # legacy: the tuple form
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: Dict[str, Any]) -> None:
    """Restore what `capture_rng` captured (all of it, or torch's generator alone)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sha256_file(path: str) -> str:
    """The file's sha256, read in 1 MB blocks (checkpoint manifests, model definition files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    root: str,
    batches: int,
    state: Dict[str, Any],
    model: Dict[str, Any],
    optimizer: Dict[str, Any],
    trainer: Dict[str, Any],
) -> str:
    """Write checkpoint `batches` atomically; returns its folder."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, str(batches))
    tmp = os.path.join(root, f".tmp-{batches}-{os.getpid()}")
    try:
        _write(tmp, state, model, optimizer, trainer)
        if os.path.exists(final):  # the same batch saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
        _write_text_atomic(os.path.join(root, "latest"), f"{batches}\n")
    except Exception as e:  # noqa: BLE001 - torch reports a full disk as a RuntimeError, not an OSError
        raise _write_error(e, root, batches) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint never stays behind
    return final


def _write(tmp: str, state: Dict[str, Any], model: Any, optimizer: Any, trainer: Any) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, obj in zip(TENSOR_FILES, (model, optimizer, trainer)):
        torch.save(obj, os.path.join(tmp, name))
    with open(os.path.join(tmp, STATE), "w") as f:
        json.dump(state, f, indent=1)
    files = [*TENSOR_FILES, STATE]
    manifest = {"files": {n: sha256_file(os.path.join(tmp, n)) for n in files}, "created": time.time()}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    for name in [*files, MANIFEST]:
        _fsync(os.path.join(tmp, name))
    _fsync(tmp)


class CheckpointWriteError(HarnessError):
    """Writing a checkpoint failed (a full disk, an I/O error): running again fails the same way until the
    cause is fixed, so `harness launch` does not retry (exit status 2)."""


def _write_error(e: BaseException, root: str, batches: int) -> CheckpointWriteError:
    try:
        st = os.statvfs(root)
        free = st.f_bfree * st.f_frsize
    except OSError:
        free = None
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (free is not None and free < 1 << 20):
        what = f"no space left on the device of {root}"
    elif isinstance(e, OSError):
        what = f"{e.strerror or type(e).__name__} ({e.filename or root})"
    else:
        what = f"{type(e).__name__}: {e} (in {root})"
    earlier = [b for b in checkpoint_dirs(root) if b != batches]
    intact = (
        f"the previous checkpoint ({earlier[0]}) is intact" if earlier else "there is no earlier checkpoint"
    )
    return CheckpointWriteError(f"{what} while writing checkpoint {batches}; {intact}")


def remove_partial(root: str) -> int:
    """Delete partial checkpoints (.tmp-* folders, latest.tmp-* files) that a killed run left; how many."""
    if not os.path.isdir(root):
        return 0
    stale = [n for n in os.listdir(root) if n.startswith(".tmp-") or n.startswith("latest.tmp-")]
    for name in stale:
        path = os.path.join(root, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return len(stale)


def verify(path: str) -> Optional[str]:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"no readable manifest ({e.__class__.__name__})"
    for name, digest in manifest.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if sha256_file(file) != digest:
            return f"{name} does not match its checksum"
    if set(manifest.get("files", {})) != {*TENSOR_FILES, STATE}:
        return "the manifest does not list every file"
    return None


def read_state(path: str) -> Dict[str, Any]:
    """A checkpoint's state.json (progress, config, hyperparameters, validation metrics)."""
    try:
        with open(os.path.join(path, STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise HarnessError(f"checkpoint {path}: cannot read state.json ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise HarnessError(f"checkpoint {path}: state.json holds a {type(state).__name__}, not a mapping")
    return state


def refused_message(file: str, e: BaseException) -> str:
    """One line for a file that torch.load(weights_only=True) refused: what it holds, that it was not
    loaded, and why (torch's own message advises turning the check off, which the harness never does)."""
    names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
    what = f" ({', '.join(names)})" if names else ""
    return (
        f"checkpoint file {file} holds objects other than tensors{what}; not loaded, for safety: a "
        "checkpoint is loaded as data (tensors, numbers, strings, lists, dicts), never as code"
    )


def load_tensors(file: str, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) of a checkpoint file; a refused payload is one HarnessError line."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise HarnessError(refused_message(file, e)) from None


def load(path: str, map_location: Any = "cpu") -> Checkpoint:
    """Load a verified checkpoint; tensors only (weights_only=True): a checkpoint is data, never code."""

    def tensors(name: str) -> Any:
        return load_tensors(os.path.join(path, name), map_location)

    return Checkpoint(
        path, read_state(path), tensors("model.pt"), tensors("optimizer.pt"), tensors("trainer.pt")
    )


def warn(message: str) -> None:
    say(f"harness: warning: {message}", sys.stderr)


def load_newest_valid(root: str) -> Optional[Checkpoint]:
    """The newest checkpoint that verifies and loads; corrupt ones are skipped with a warning."""
    for batches in checkpoint_dirs(root):
        path = os.path.join(root, str(batches))
        problem = verify(path)
        if problem is None:
            try:
                return load(path)
            except HarnessError as e:  # objects other than tensors: one line of its own, not torch's advice
                problem = f"cannot be loaded: {e}"
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped the same way
                problem = f"cannot be loaded ({describe(e)})"
        warn(f"checkpoint {path} is corrupt: {problem}; skipping it")
    return None


def apply_retention(
    root: str, keep_latest: int, keep_best: int, metric: Optional[str], smaller_is_better: bool
) -> None:
    """Delete checkpoints that are neither among the newest `keep_latest` nor the best `keep_best`."""
    all_batches = checkpoint_dirs(root)
    keep = set(all_batches[:keep_latest])
    if metric and keep_best > 0:
        keep.update(reports.ranked_checkpoints(root, all_batches, metric, smaller_is_better)[:keep_best])
    for b in all_batches:
        if b not in keep:
            shutil.rmtree(os.path.join(root, str(b)), ignore_errors=True)


def _move_aside(output_dir: str, names: List[str]) -> str:
    base = os.path.join(output_dir, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
    dest, n = base, 1
    while os.path.exists(dest):  # two fresh starts within one second
        dest, n = f"{base}-{n}", n + 1
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(output_dir, name), os.path.join(dest, name))
    return dest


KEEP_PREVIOUS = 3  # earlier runs kept in OUTPUT/previous-<time>/ (the newest ones)
_PREVIOUS = re.compile(r"previous-(\d{8}-\d{6})(?:-(\d+))?")


def prune_previous(output_dir: str, keep: int = KEEP_PREVIOUS) -> List[str]:
    """Delete all but the newest `keep` OUTPUT/previous-<time>/ folders; the names of those deleted."""
    found = []
    for name in os.listdir(output_dir):
        m = _PREVIOUS.fullmatch(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append(((m.group(1), int(m.group(2) or 0)), name))  # -1, -2: same second, later
    old = [name for _, name in sorted(found, reverse=True)[keep:]]
    for name in sorted(old):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return sorted(old)


@dataclass
class OutputPlan:
    """Rank 0's plan for OUTPUT: the checkpoint to resume from, or the earlier run to move aside first."""

    output_dir: str
    ckpt: Optional[Checkpoint]
    earlier: List[str]  # names of an earlier run's files, moved aside when training starts
    why: str = ""

    def start(self) -> None:
        """Move the earlier run aside: called once set-up has succeeded, so a run that fails in set-up
        leaves the earlier one where it was."""
        if self.earlier:
            dest = _move_aside(self.output_dir, self.earlier)
            say(f"harness: {self.why}: moved the earlier run in {self.output_dir} to {dest}")
            self.earlier = []
            removed = prune_previous(self.output_dir)
            if removed:
                say(
                    f"harness: removed the oldest earlier run(s) {', '.join(removed)} from {self.output_dir} "
                    f"(the newest {KEEP_PREVIOUS} previous-<time>/ folders are kept)"
                )


EARLIER_RUN_FILES = ("metrics.jsonl", "checkpoints", "tensorboard", "config.yaml", "curves.png")


def prepare_output(output_dir: str, fresh: bool, resume_from: Optional[str]) -> OutputPlan:
    """Rank 0, before training: the checkpoint to resume from, if any.

    `--resume PATH` names one; otherwise the newest valid one under OUTPUT/checkpoints. When a run starts
    from scratch (`--fresh`, or nothing to resume) in a folder that holds an earlier run, that run is moved
    to OUTPUT/previous-<time>/ once set-up succeeds (`OutputPlan.start`), with a message: nothing is
    overwritten silently. Of those folders the newest KEEP_PREVIOUS are kept; older ones are deleted then,
    named in one line.
    """
    os.makedirs(output_dir, exist_ok=True)
    root = os.path.join(output_dir, "checkpoints")
    partial = remove_partial(root)
    if partial:
        say(f"harness: removed {partial} partial checkpoint file(s) that an interrupted run left in {root}")
    if resume_from:
        problem = verify(resume_from) if os.path.isdir(resume_from) else "no such checkpoint folder"
        if problem:
            raise HarnessError(f"--resume {resume_from}: {problem}")
        return OutputPlan(output_dir, load(resume_from), [])
    ckpt = None if fresh else load_newest_valid(root)
    if ckpt is not None:
        return OutputPlan(output_dir, ckpt, [])
    earlier = [n for n in EARLIER_RUN_FILES if os.path.exists(os.path.join(output_dir, n))]
    if earlier == ["config.yaml"]:  # only a config: a run that failed in set-up, nothing to keep
        earlier = []
    why = "--fresh" if fresh else "no valid checkpoint to resume from"
    return OutputPlan(output_dir, None, earlier, why)
