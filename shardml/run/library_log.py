"""What the libraries under shardml say about failures shardml has handled - Orbax's and
TensorStore's tracebacks when a damaged checkpoint is skipped, absl log lines, library warnings -
goes to ``OUT_DIR/library.log`` for the run's duration instead of the user's terminal; shardml's
own line about the event (``shardml: skipping damaged checkpoint ...``) names the file.

    with LibraryLog("runs/x"):                   # the run; prints nothing itself
        ...
        line = handled("checkpoint step 24", err)   # the traceback into the log; " (details: runs/x/library.log)"

The file is created on its first entry. What is caught: the absl (Orbax) and ``tensorstore``
loggers from WARNING up, warnings raised in those packages, and "unraisable" exceptions
(``sys.unraisablehook``: TensorStore's callbacks into an event loop that Orbax closed after a failed
read, printed from TensorStore's threads, often after the read returned). Exceptions that stop the
run are not caught here; they reach the user as always.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import traceback
import warnings

# Loggers of the libraries whose handled failures are logged (Orbax logs through absl).
LOGGERS = ("absl", "tensorstore")
# Packages whose warnings go to the log.
PACKAGES = ("orbax", "tensorstore", "absl")

_active: LibraryLog | None = None


class LibraryLog:
    """A context manager: while open, library output (see the module docstring) is appended to
    ``OUT_DIR/<name>``; with ``out_dir`` None it changes nothing."""

    def __init__(self, out_dir: str | None, name: str = "library.log"):
        self.path = os.path.join(out_dir, name) if out_dir is not None else None
        self._lock = threading.Lock()
        self._file = None
        self._handler = logging.StreamHandler(self)
        self._handler.setLevel(logging.WARNING)
        self._handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._saved: dict = {}

    def write(self, text: str) -> None:
        """Appends ``text`` (a stream's ``write``: the log handler writes here too)."""
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "a")  # noqa: SIM115 - open until the run ends
            self._file.write(text)
            self._file.flush()

    def flush(self) -> None:
        pass

    def entry(self, title: str, lines: list[str]) -> None:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        self.write(f"--- {stamp} {title}\n{''.join(lines)}")

    def _unraisable(self, hook) -> None:
        self.entry(f"unraisable exception ({hook.err_msg or 'in a library thread'})",
                   traceback.format_exception(hook.exc_type, hook.exc_value, hook.exc_traceback))

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if any(f"{os.sep}{package}{os.sep}" in filename for package in PACKAGES):
            self.entry("warning", [warnings.formatwarning(message, category, filename, lineno, line)])
        else:
            self._saved["showwarning"](message, category, filename, lineno, file, line)

    def __enter__(self) -> LibraryLog:
        global _active
        if self.path is None:
            return self
        self._saved = {"unraisablehook": sys.unraisablehook, "showwarning": warnings.showwarning,
                       "propagate": {name: logging.getLogger(name).propagate for name in LOGGERS},
                       "active": _active}
        sys.unraisablehook, warnings.showwarning = self._unraisable, self._warning
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self._handler)
            logger.propagate = False  # not also to the root logger's handlers (absl's: stderr)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if self.path is None:
            return
        sys.unraisablehook, warnings.showwarning = self._saved["unraisablehook"], self._saved["showwarning"]
        for name, propagate in self._saved["propagate"].items():
            logger = logging.getLogger(name)
            logger.removeHandler(self._handler)
            logger.propagate = propagate
        _active = self._saved["active"]
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def handled(what: str, err: BaseException) -> str:
    """Writes the traceback of ``err`` (a failure shardml handled, with its causes) to the open
    log; returns the note for shardml's own line: ``" (details: OUT_DIR/library.log)"``, or ""
    when no log is open."""
    if _active is None:
        return ""
    _active.entry(f"handled: {what}", traceback.format_exception(type(err), err, err.__traceback__))
    return f" (details: {_active.path})"
