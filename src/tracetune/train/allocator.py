"""Keep freed CPU memory in the process while training on CPU.

glibc hands every allocation over its mmap threshold (at most 32 MB) straight to the kernel and unmaps it on
free, so a CPU training step that frees and re-creates its large tensors (the tied 262K x 640 embedding's
gradient and bf16 copies, the LM head's logits) page-faults hundreds of megabytes back in on every step:
about a third of a Gemma 3 270M step on this project's 2-core machine (docs/PERFORMANCE.md). With mmap off
and trimming off, freed blocks stay in the heap and the next step reuses them. On exit the defaults come back
and `malloc_trim` returns the free memory to the system.

Only glibc on Linux is touched; elsewhere, or with TRACETUNE_CPU_ALLOCATOR=system, this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and glibc's defaults.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NEVER_TRIM = 2**31 - 1  # an int: mallopt takes one


def _glibc():
    if sys.platform != "linux" or os.environ.get("TRACETUNE_CPU_ALLOCATOR", "heap") == "system":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - absent on musl
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """Within the block, serve every allocation from the heap and never give freed memory back."""
    libc = _glibc() if enabled else None
    if libc is None or not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        yield False
        return
    log.debug("CPU allocator: heap only, no trimming, until training ends")
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
