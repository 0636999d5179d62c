import sys

import pytest
import torch

from tracetune.train.allocator import reuse_freed_memory

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt is Linux-only")
MB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _rss_drop_on_free() -> int:
    block = torch.ones(64 * MB, dtype=torch.uint8)  # over glibc's 32 MB mmap ceiling
    held = _rss()
    del block
    return held - _rss()


def test_freed_blocks_stay_in_the_process_only_inside_the_block():
    with reuse_freed_memory() as active:
        assert active
        kept = _rss_drop_on_free()
    returned = _rss_drop_on_free()
    assert kept < 8 * MB, "inside, a freed 64 MB block should stay mapped for reuse"
    assert returned > 56 * MB, "outside, glibc's defaults must be back: the block goes back to the system"


def test_opt_out(monkeypatch):
    monkeypatch.setenv("TRACETUNE_CPU_ALLOCATOR", "system")
    with reuse_freed_memory() as active:
        assert not active
        assert _rss_drop_on_free() > 56 * MB
    with reuse_freed_memory(enabled=False) as active:
        assert not active
