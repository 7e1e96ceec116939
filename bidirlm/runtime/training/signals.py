"""Stopping a run cleanly: SIGTERM or a first Ctrl-C asks the loop to checkpoint after the
current step and stop; a second Ctrl-C aborts at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class StopSignals:
    """Sets `.raised` (and `.reason`: "SIGTERM" or "Ctrl-C") on SIGTERM or a first Ctrl-C while
    active; a second Ctrl-C raises KeyboardInterrupt at once. Handlers are installed only in the
    main thread and restored on exit. `log` receives the one-line notice."""

    SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.raised = False
        self.reason = ""
        self.log = log
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self.raised:
            raise KeyboardInterrupt  # the second Ctrl-C: abort without saving
        self.raised = True
        self.reason = self.SIGNALS.get(signum, str(signum))
        again = " (press Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        if self.log is not None:
            self.log(f"{self.reason}: saving a checkpoint after this step, then stopping{again}")

    def __exit__(self, *exc: object) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old = {}
