"""The one exception type for bad input (shown to the user as a single line), and console output."""

import os
import sys
from typing import Optional, TextIO


class HarnessError(Exception):
    """A problem with the user's model definition, config or data.

    The CLI prints ``harness: error: <message>`` (no traceback) and exits with status 2, the status that
    means "a deterministic error in the input; running it again will not help".
    """

    exit_code = 2


# In the one line of a trial that raised det.InvalidHP (harness/train): a search records it as invalid.
INVALID_HP = "raised InvalidHP"


class Interrupted(Exception):
    """A stop that is not a plain end of training: after Ctrl-C the process exits 130 (the ranks stopped
    at an agreed batch and checkpointed), after a stop before training its message says so."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class PeerFailure(Exception):
    """This rank stops because another rank failed (and reports that failure itself)."""


def check_model_path(path: str) -> None:
    """A model definition is a folder or a .py file in one; another file is named, not read as its folder."""
    if os.path.isfile(path) and not path.endswith(".py"):
        raise HarnessError(
            f"model definition {os.path.abspath(path)} is a file, not a directory: give the folder that "
            "holds model_def.py (or a .py file)"
        )


def describe(e: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line: a message of several lines (NumPy's and torch's often are) joined,
    and cut at `limit` characters, so that an error stays the one line the launcher shows per rank."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def say(line: str, stream: Optional[TextIO] = None) -> None:
    """Print one line in a single write, so that launchers tagging output ([1,0]<stdout>:) keep it whole.

    A closed reader (`harness ... | head`) does not end training: the console goes quiet, the files
    (metrics.jsonl, TensorBoard, checkpoints) are written as always.
    """
    stream = stream or sys.stdout
    try:
        stream.write(line + "\n")
        stream.flush()
    except BrokenPipeError:
        _silence(stream)


def _silence(stream: TextIO) -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, ValueError):  # not a real file (a test's StringIO)
        pass
