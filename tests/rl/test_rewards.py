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
        (
            "Reasoning:\n1. Cost: 2 * 5 = 10\nAnswer: 10",
            "eos",
            {"verified": 1, "correct": 1, "steps_valid": 1, "format": 1},
        ),
        (
            "Reasoning:\n1. Cost: 2 * 5 = 12\nAnswer: 10",
            "eos",
            {"verified": 0, "correct": 1, "steps_valid": 0, "format": 1},
        ),
        (
            "Reasoning:\n1. Cost: 2 * 6 = 12\nAnswer: 12",
            "eos",
            {"verified": 0, "correct": 0, "steps_valid": 1, "format": 1},
        ),
        (
            "Reasoning:\n1. Cost: 2 * 5 = 10\nAnswer: 10",
            "length",
            {"verified": 1, "correct": 1, "steps_valid": 1, "format": 0},
        ),
        (
            "The total is 10",
            "eos",
            {"verified": 0, "correct": 1, "steps_valid": 0, "format": 0},
        ),  # last number, no checked step
        (
            "Reasoning:\n1. Two notebooks at five dollars.\nAnswer: 10",
            "eos",
            {"verified": 0, "correct": 1, "steps_valid": 0, "format": 1},
        ),
    ],
)
def test_reward_terms(completion, finish, expected):
    assert reward_terms(score_item(ITEM, completion), finish) == {k: float(v) for k, v in expected.items()}


def test_total_reward_weights_each_term():
    weights = RewardWeights(verified=0.0, correct=1.0, steps_valid=0.5, format=0.25)
    assert total_reward({"verified": 0.0, "correct": 1.0, "steps_valid": 0.0, "format": 1.0}, weights) == 1.25
    assert total_reward({"verified": 0.0, "correct": 0.0, "steps_valid": 1.0, "format": 0.0}, weights) == 0.5


def test_default_reward_never_ranks_a_short_wrong_completion_above_a_longer_verified_one():
    """Under the default (verified only) reward, stopping early cannot pay: every wrong or unchecked completion
    earns 0, every verified one 1. Under the old shaped weights, one valid step then a wrong answer outranked
    trying a second step and slipping."""
    item = EvalItem("p", "A $620 coat is 40% off. What does it cost?", "372")
    verified = "Reasoning:\n1. 620 * 40 / 100 = 248\n2. 620 - 248 = 372\nAnswer: 372"
    wrong = [
        "Reasoning:\n1. 620 * 40 / 100 = 248\nAnswer: 248",  # one valid step, then answer
        "Reasoning:\n1. 40 = 40\nAnswer: 40",
        "Answer: 372",  # right, but no checked step
        "Reasoning:\n1. 620 * 40 / 100 = 248\n2. 620 - 248 = 362\nAnswer: 362",  # tried and slipped
    ]

    def reward(text, weights=None):
        return total_reward(reward_terms(score_item(item, text), "eos"), weights or RewardWeights())

    assert reward(verified) == 1.0 and all(reward(w) == 0.0 for w in wrong)
    shaped = RewardWeights(verified=0.0, correct=1.0, steps_valid=0.5, format=0.1)
    assert reward(wrong[0], shaped) > reward(wrong[3], shaped)  # what the default no longer pays for


def test_group_advantages():
    assert group_advantages([1.0, 0.0, 0.0, 1.0], scale=False) == [0.5, -0.5, -0.5, 0.5]
    scaled = group_advantages([1.0, 0.0, 0.0, 1.0], scale=True)
    assert scaled[0] == pytest.approx(0.5 / (1 / 3) ** 0.5, rel=1e-3) and scaled[1] == -scaled[0]
    assert group_advantages([0.7, 0.7, 0.7], scale=True) == [0.0, 0.0, 0.0]
    assert group_advantages([0.7, 0.7], scale=False) == [0.0, 0.0]
