"""Logging to the console and to UTF-8, LF-terminated log files inside the run directory."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER = logging.getLogger("tracetune")
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")


def setup_console(level: int = logging.INFO) -> None:
    if not any(getattr(h, "_tracetune_console", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._tracetune_console = True
        LOGGER.addHandler(handler)
    LOGGER.setLevel(level)


class log_to_file:  # noqa: N801 - used as a context manager, reads like a function
    """Send the tracetune logger to `path` (UTF-8, LF) for the duration of a `with` block."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.handler.setFormatter(_FORMAT)

    def __enter__(self):
        LOGGER.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        LOGGER.removeHandler(self.handler)
        self.handler.close()
