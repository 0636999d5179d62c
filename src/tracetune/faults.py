"""Graceful stops on SIGTERM/SIGINT, and the fault-injection points the reliability tests use.

`crash_point(name)` marks a place where a real crash could happen (mid-step, inside the checkpoint
writer, between eval batches). It does nothing unless a test sets one of:
  TRACETUNE_FAULT_LOG=FILE      append each point's name to FILE (to enumerate them)
  TRACETUNE_KILL_AT=N           SIGKILL this process at the N-th point reached (1-based)
  TRACETUNE_KILL_AT_POINT=NAME  SIGKILL this process at the point of that name
  TRACETUNE_FAULT_RANK=R        under torchrun, only rank R obeys the two variables above
  TRACETUNE_SIGTERM_AT=N        send this process SIGTERM at the N-th point reached
  TRACETUNE_NAN_AT_STEP=S       make the loss of optimizer step S NaN (see `nan_injected`)
"""

from __future__ import annotations

import os
import signal

from tracetune.errors import TracetuneError

_hits = 0


def crash_point(name: str) -> None:
    global _hits
    _hits += 1
    log_path = os.environ.get("TRACETUNE_FAULT_LOG")
    if log_path:
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(name + "\n")
    rank = os.environ.get("RANK", "0")
    if os.environ.get("TRACETUNE_FAULT_RANK", rank) == rank and (
        os.environ.get("TRACETUNE_KILL_AT") == str(_hits) or os.environ.get("TRACETUNE_KILL_AT_POINT") == name
    ):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("TRACETUNE_SIGTERM_AT") == str(_hits):
        os.kill(os.getpid(), signal.SIGTERM)


def nan_injected(step: int) -> bool:
    return os.environ.get("TRACETUNE_NAN_AT_STEP") == str(step)


class Interrupted(TracetuneError):
    """A stop was requested by a signal; state was saved. Exit code 128 + signal number (143, 130)."""

    def __init__(self, signum: int, where: str):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; resume with `tracetune resume RUN_DIR`")


class StopSignals:
    """While active, the first SIGTERM/SIGINT only sets `requested`; a second one exits at once."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}
        self._depth = 0  # re-entrant: the pipeline and the training loop both hold it

    def _handle(self, signum, frame):
        if self.requested is not None:
            os._exit(128 + signum)
        self.requested = signum

    def check(self, where: str) -> None:
        """Raise Interrupted if a stop was requested (call at a safe point, after saving state)."""
        if self.requested is not None:
            raise Interrupted(self.requested, where)

    def __enter__(self):
        if self._depth == 0:
            self.requested = None
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


STOP = StopSignals()
