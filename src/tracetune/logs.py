"""Logging to the console and to UTF-8, LF-terminated log files inside the run directory."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

LOGGER = logging.getLogger("tracetune")
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 writes logs; others print warnings."""
    return int(os.environ.get("RANK", "0"))


class _TqdmHandler(logging.Handler):
    """Console output that keeps an active progress bar on the bottom line."""

    def emit(self, record: logging.LogRecord) -> None:
        if _rank() == 0:
            tqdm.write(self.format(record), file=sys.stderr)
        elif record.levelno >= logging.WARNING:
            tqdm.write(f"[rank {_rank()}] {self.format(record)}", file=sys.stderr)


def setup_console(level: int = logging.INFO) -> None:
    """Console gets INFO and up; log files get DEBUG too (per-step lines)."""
    if not any(isinstance(h, _TqdmHandler) for h in LOGGER.handlers):
        handler = _TqdmHandler(level)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class log_to_file:  # noqa: N801 - used as a context manager, reads like a function
    """Send the tracetune logger to `path` (UTF-8, LF) for the duration of a `with` block."""

    def __init__(self, path: Path):
        self.handler = None
        if _rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(path, mode="a", encoding="utf-8")
            self.handler.setFormatter(_FORMAT)

    def __enter__(self):
        if self.handler:
            LOGGER.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        if self.handler:
            LOGGER.removeHandler(self.handler)
            self.handler.close()
