"""Logging for the CLI and the window: a rotating file in the user's log folder, plus stderr.

The file receives everything from INFO up, with tracebacks, so that a window started without a
console (pythonw on Windows, a desktop entry on Linux) still leaves a record of what went wrong.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

from core.paths import user_log_dir

LOG_FILE_NAME = "video-trainer.log"
# Pass as extra= to log a record only to the file (for example a traceback already summarised in one line).
FILE_ONLY = {"file_only": True}
# Library loggers whose warnings are notes for developers, not for the user: bitsandbytes warns on
# every import on CPU-only machines that an optional CPU 4-bit kernel (fetched from a hub) is absent,
# and the `kernels` package (which transformers 5.25 pulls in) that it skips its publisher check
# when the hub is offline, as every test and every offline user runs.
FILE_ONLY_LOGGERS = ("bitsandbytes.backends.cpu", "kernels")
_configured: Path | None = None


class _ConsoleFormatter(logging.Formatter):
    """One line per record: tracebacks belong in the log file, not in the user's terminal."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def log_file_path() -> Path:
    return user_log_dir() / LOG_FILE_NAME


def _shown_on_console(record: logging.LogRecord) -> bool:
    if getattr(record, "file_only", False):
        return False
    return not record.name.startswith(FILE_ONLY_LOGGERS)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not the stream it was when
    logging was set up: a replaced stderr (a test's capture, a redirecting host) may be closed by
    then, and every later record would end in a "--- Logging error ---" traceback."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # StreamHandler.__init__ and setStream assign it; the current sys.stderr always wins

    def emit(self, record: logging.LogRecord) -> None:
        if sys.stderr is not None:
            super().emit(record)


def setup_logging(console_level: int = logging.WARNING) -> Path | None:
    """Configure the root logger once; return the log file, or None if it cannot be written."""
    global _configured
    root = logging.getLogger()
    if _configured is not None:
        return _configured
    root.setLevel(logging.INFO)
    if sys.stderr is not None:  # pythonw on Windows has no stderr
        console = _StderrHandler()
        console.setLevel(console_level)
        console.setFormatter(_ConsoleFormatter("%(levelname)s: %(message)s"))
        console.addFilter(_shown_on_console)
        root.addHandler(console)
    path = log_file_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=5_000_000, backupCount=3, encoding="utf-8")
    except OSError as e:
        logging.getLogger(__name__).warning("cannot write the log file %s (%s); logging to the console only", path, e)
        return None
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    _configured = path
    return path
