"""Stopping on SIGTERM (docker stop, cluster preemption) or SIGUSR1 at a batch boundary, on every rank.

The handler only raises a flag. At each batch the ranks agree whether any of them saw a signal (a
one-number allreduce started before the forward pass and finished after the optimizer step, so it
overlaps the batch's work), then all checkpoint at the same batch and exit 0.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore_defaults(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
