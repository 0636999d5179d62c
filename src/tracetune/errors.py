"""User-facing error types. A user's mistake raises one of these; `assert` is for internal invariants."""

from __future__ import annotations

from dataclasses import dataclass


class TracetuneError(Exception):
    """Base class of every error caused by the user's input or environment; the CLI prints it and exits 2."""

    exit_code = 2


class ConfigError(TracetuneError):
    """The configuration is invalid. `problems` holds every problem found, one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in config {source}:\n{lines}")


class DataError(TracetuneError):
    """A data file is invalid. `issues` holds every error found (file:line, field, problem, fix)."""

    def __init__(self, issues: list):
        self.issues = issues
        lines = "\n".join(f"  - {i}" for i in issues[:50])
        more = f"\n  ... and {len(issues) - 50} more" if len(issues) > 50 else ""
        super().__init__(f"{len(issues)} data error(s):\n{lines}{more}")


class SourceError(TracetuneError):
    """A model source cannot be resolved or loaded."""


class ExportError(TracetuneError):
    """A model cannot be exported as asked (an architecture or tokenizer the format cannot hold)."""


class RunDirError(TracetuneError):
    """The run directory cannot be used as asked (exists without resume, locked, changed config)."""


class GateFailure(TracetuneError):
    """One or more quality gates failed; everything was written before this was raised."""

    exit_code = 3


@dataclass(frozen=True)
class Issue:
    path: str
    line: int
    field: str
    problem: str
    fix: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.severity}: {self.field}: {self.problem}; fix: {self.fix}"
