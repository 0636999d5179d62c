"""The reward of one sampled completion, from the evaluation's own checkers (pure functions).

Terms, each 0 or 1, weighted by `grpo.reward`: `verified` (the default, weight 1: the answer is right and at
least one step was checked and every checked step holds, as DAPO, Dr. GRPO and DeepSeek-R1 reward verified
correctness only); and, off by default, the shaped terms: the answer is right (eval/score.py), the work holds
(eval/steps.py: at least one step was checked and none failed), the form (an `Answer:` line, and the completion
ended before max_new_tokens). The shaped terms pay for stopping early: with correct 1 and steps_valid 0.5, one
valid step then a wrong answer earns 0.6 where trying a second step and slipping earns 0.1, so groups with no
right answer teach "one easy step, then answer" (docs/PERFORMANCE.md measured completions falling from 53 to 28
tokens under it).
"""

from __future__ import annotations

from tracetune.config import RewardWeights

TERMS = ("verified", "correct", "steps_valid", "format")


def reward_terms(score: dict, finish_reason: str) -> dict[str, float]:
    """Each term of one completion, from its score_item row and finish reason."""
    steps_valid = score["steps_checked"] > 0 and score["work_valid"]
    return {
        "verified": float(bool(score["correct"]) and steps_valid),
        "correct": float(bool(score["correct"])),
        "steps_valid": float(steps_valid),
        "format": float(score["extraction_rule"] == "answer_marker" and finish_reason != "length"),
    }


def total_reward(terms: dict[str, float], weights: RewardWeights) -> float:
    return sum(getattr(weights, name) * terms[name] for name in TERMS)


def group_advantages(rewards: list[float], scale: bool) -> list[float]:
    """Each reward minus its group's mean; with `scale`, divided by the group's standard deviation (GRPO) as
    well. A group whose rewards are all equal gets zeros."""
    if max(rewards) == min(rewards):  # exactly: a float mean of equal values need not equal them
        return [0.0] * len(rewards)
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not scale:
        return centred
    std = (sum(c * c for c in centred) / (len(rewards) - 1)) ** 0.5
    return [c / (std + 1e-4) for c in centred]
