"""The process's memory allocator: tcmalloc when the system has it, for the verbs that train or generate.

A CPU training step frees and re-creates tensors of tens to hundreds of MB (the LM head's logit chunks
and their gradient, casts, oneDNN's scratch). glibc hands every block over 32 MB back to the kernel on
free, so each step page-faults them back in; tcmalloc keeps them for reuse, which makes CPU training faster
at less peak memory (docs/PERFORMANCE.md has the measurements). glibc with mmap turned off was as fast for a
few steps but fragmented.

An allocator must be chosen before the process starts, so `tracetune run/train/resume/eval` re-executes
itself once with tcmalloc in LD_PRELOAD when it is installed (`libtcmalloc-minimal4` on Debian and Ubuntu,
`gperftools` elsewhere) and not yet loaded. TRACETUNE_ALLOCATOR=system keeps the system allocator. What
ran is recorded in env.json.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

VERBS = ("run", "train", "resume", "eval")
ENV = "TRACETUNE_ALLOCATOR"  # "auto" (default): tcmalloc when installed; "system": never re-execute
_REEXECUTED = "TRACETUNE_ALLOCATOR_REEXECUTED"
# tcmalloc reports every allocation over 1 GB on stderr; a 262K-vocabulary model makes a few of those.
_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc() -> str | None:
    """The tcmalloc shared library the dynamic loader would find, or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def active() -> str:
    """Which allocator this process runs on: tcmalloc, jemalloc or glibc (the system's)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def preload_env(env: dict[str, str], library: str) -> dict[str, str]:
    """env with `library` first in LD_PRELOAD and tcmalloc's large-allocation reports off."""
    preload = " ".join(x for x in (library, env.get("LD_PRELOAD", "")) if x)
    return {**_QUIET, **env, "LD_PRELOAD": preload}


def _may_reexec(argv: list[str], env: dict[str, str]) -> bool:
    """The checks that need neither the loader nor /proc: a training or evaluation verb on Linux, not opted
    out, not re-executed already."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    return verb in VERBS and sys.platform == "linux" and env.get(ENV, "auto") != "system" and not env.get(_REEXECUTED)


def reexec_plan(argv: list[str], env: dict[str, str], library: str | None, current: str) -> dict[str, str] | None:
    """The environment to re-execute with, or None to carry on as is."""
    if not _may_reexec(argv, env) or library is None or current != "glibc":
        return None
    return {**preload_env(env, library), _REEXECUTED: "1"}


def maybe_reexec(argv: list[str]) -> None:
    """Replace this process with itself under tcmalloc when the plan says so (same pid, same arguments)."""
    if not _may_reexec(argv, dict(os.environ)):  # other verbs and the re-executed process skip the lookups
        return
    env = reexec_plan(argv, dict(os.environ), find_tcmalloc(), active())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, sys.orig_argv, env)
        except OSError as exc:  # carry on as is: slower, never broken
            print(f"warning: could not re-execute under tcmalloc ({exc}); using the system allocator", file=sys.stderr)


def hint() -> str | None:
    """A line for the training log when tcmalloc would help and is not in use (None otherwise)."""
    if active() != "glibc" or os.environ.get(ENV, "auto") == "system":
        return None
    return (
        "memory allocator: glibc; CPU training runs faster under tcmalloc (apt install "
        "libtcmalloc-minimal4, or your system's gperftools; TRACETUNE_ALLOCATOR=system silences this)"
    )


def describe() -> dict:
    """For env.json: the allocator that ran and whether tcmalloc could have."""
    return {"allocator": active(), "tcmalloc_installed": find_tcmalloc(), ENV: os.environ.get(ENV, "auto")}
