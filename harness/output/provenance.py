"""Which code a checkpoint may run: the model definition it names is imported only where that is safe.

A checkpoint is data. It records the folder of the model definition that trained it (state.json
`model_dir`), so that `load_trial(checkpoint)` and `harness export` work without naming it again, and the
sha256 of each of that folder's .py files (`model_files`). Without an explicit `model_dir`, the recorded
folder is imported only when
  1. it still holds exactly those .py files, unchanged (the code that trained the weights), and
  2. it and those files belong to this user (or root) and are not writable by every user (another user's
     folder or file is not this user's code);
and the import is said in one line. Otherwise one line asks for `model_dir`. A checkpoint that comes from
someone else names paths (and hashes) of their choosing: load it with a `model_dir` you have read.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Dict, Optional

from harness.errors import HarnessError
from harness.output.checkpoint import sha256_file

MAX_FILES = 2000  # a model definition folder, not a home directory: beyond this nothing is recorded


def fingerprint(directory: str) -> Optional[Dict[str, str]]:
    """{relative path: sha256} of the .py files under `directory` (bytecode caches and hidden folders
    left out), or None for a folder too large to be a model definition."""
    found: Dict[str, str] = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                if len(found) >= MAX_FILES:
                    return None
                path = os.path.join(root, name)
                found[os.path.relpath(path, directory)] = sha256_file(path)
    return found


def recorded_definition(state: Dict[str, Any], ckpt: str, flag: str) -> str:
    """The recorded model definition folder of checkpoint `ckpt`, if the rules above allow importing it;
    else a HarnessError asking for `flag`DIR."""
    recorded, files = state.get("model_dir"), state.get("model_files")
    ask = f"pass {flag}DIR (the model definition directory)"
    if not recorded:
        raise HarnessError(f"checkpoint {ckpt} does not name its model definition; {ask}")
    if not os.path.isdir(recorded):
        raise HarnessError(f"checkpoint {ckpt} names {recorded}, which does not exist; {ask}")
    if not isinstance(files, dict) or not files:
        raise HarnessError(
            f"checkpoint {ckpt} names {recorded} but records no hashes of its files (written before they "
            f"were recorded): which code it ran cannot be checked; {ask}"
        )
    now = fingerprint(recorded) or {}
    changed = sorted(p for p in set(files) | set(now) if files.get(p) != now.get(p))
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise HarnessError(
            f"checkpoint {ckpt} names {recorded}, whose files differ from those it was trained with "
            f"({', '.join(changed[:3])}{more}); {ask}"
        )
    for path in [recorded, *(os.path.join(recorded, p) for p in files)]:
        why = _not_ours(path)
        if why:
            raise HarnessError(
                f"checkpoint {ckpt} names {recorded}, which this user cannot vouch for ({path} {why}); {ask}"
            )
    return recorded


def _not_ours(path: str) -> Optional[str]:
    st = os.stat(path)
    if st.st_uid not in (os.getuid(), 0):
        return f"belongs to uid {st.st_uid}"
    if st.st_mode & stat.S_IWOTH:
        return "is writable by every user"
    return None
