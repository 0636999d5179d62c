"""Reward terms and group advantages on hand-made completions."""

import pytest

from tracetune.config import RewardWeights
from tracetune.data.traces import EvalItem
from tracetune.eval.scoring import score_item
from tracetune.rl.rewards import group_advantages, reward_terms, total_reward

ITEM = EvalItem("q1", "Jun buys 2 notebooks at $5 each. How many dollars?", "10")


@pytest.mark.parametrize(
    ("completion", "finish", "expected"),
    [
        ("Reasoning:\n1. Cost: 2 * 5 = 10\nAnswer: 10", "eos", {"correct": 1, "steps_valid": 1, "format": 1}),
        ("Reasoning:\n1. Cost: 2 * 5 = 12\nAnswer: 10", "eos", {"correct": 1, "steps_valid": 0, "format": 1}),
        ("Reasoning:\n1. Cost: 2 * 6 = 12\nAnswer: 12", "eos", {"correct": 0, "steps_valid": 1, "format": 1}),
        ("Reasoning:\n1. Cost: 2 * 5 = 10\nAnswer: 10", "length", {"correct": 1, "steps_valid": 1, "format": 0}),
        ("The total is 10", "eos", {"correct": 1, "steps_valid": 0, "format": 0}),  # last number, no checked step
        (
            "Reasoning:\n1. Two notebooks at five dollars.\nAnswer: 10",
            "eos",
            {"correct": 1, "steps_valid": 0, "format": 1},
        ),
    ],
)
def test_reward_terms(completion, finish, expected):
    assert reward_terms(score_item(ITEM, completion), finish) == {k: float(v) for k, v in expected.items()}


def test_total_reward_weights_each_term():
    weights = RewardWeights(correct=1.0, steps_valid=0.5, format=0.25)
    assert total_reward({"correct": 1.0, "steps_valid": 0.0, "format": 1.0}, weights) == 1.25
    assert total_reward({"correct": 0.0, "steps_valid": 1.0, "format": 0.0}, weights) == 0.5


def test_group_advantages():
    assert group_advantages([1.0, 0.0, 0.0, 1.0], scale=False) == [0.5, -0.5, -0.5, 0.5]
    scaled = group_advantages([1.0, 0.0, 0.0, 1.0], scale=True)
    assert scaled[0] == pytest.approx(0.5 / (1 / 3) ** 0.5, rel=1e-3) and scaled[1] == -scaled[0]
    assert group_advantages([0.7, 0.7, 0.7], scale=True) == [0.0, 0.0, 0.0]
    assert group_advantages([0.7, 0.7], scale=False) == [0.0, 0.0]
