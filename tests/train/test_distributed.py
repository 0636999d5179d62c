"""The pieces of train/distributed.py that need no process group."""

import pytest

from tracetune.dist import Dist
from tracetune.train.distributed import shard_window


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("window_size", [1, 2, 5, 8, 9])
def test_shard_window_uses_every_micro_batch_once_and_gives_ranks_equal_passes(world_size, window_size):
    window = [f"b{i}" for i in range(window_size)]
    shares = [shard_window(window, Dist(rank=r, world_size=world_size, backend="gloo")) for r in range(world_size)]
    real = sorted(b for share in shares for b, weight in share if weight == 1.0)
    assert real == sorted(window)  # no duplicates, no gaps
    assert len({len(share) for share in shares}) == 1  # every rank runs the same number of passes
    assert all(weight in (0.0, 1.0) for share in shares for _, weight in share)


def test_shard_window_of_nothing_is_nothing():
    assert shard_window([], Dist(rank=1, world_size=2, backend="gloo")) == []
