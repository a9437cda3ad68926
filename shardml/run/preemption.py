"""Graceful stops: SIGTERM or SIGINT asks the training loop to stop after the current step.

Schedulers preempt a job with SIGTERM (then SIGKILL after a grace period); Ctrl-C sends SIGINT.
Inside :class:`StopRequest` the first such signal only records its name; the loop finishes the step,
saves a checkpoint and returns. A second signal acts as it would without shardml (a second Ctrl-C
raises KeyboardInterrupt).

    with StopRequest() as stop:
        for step in range(steps):
            ...
            if stop.signal:
                save(); break
"""

from __future__ import annotations

import signal
import threading
from typing import Self

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records the first SIGTERM / SIGINT in ``signal`` (its name, e.g. ``"SIGTERM"``).

    Handlers are installed only in the main thread (Python's rule); elsewhere this does nothing.
    """

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.signal = self.signal or signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])  # a second one is not intercepted

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
