import random

import pytest

from tracetune.data.synth import corrupt_one_number, generate
from tracetune.eval.steps import check_steps

CASES = [
    # (steps, answer, steps_checked, steps_valid, first_bad_step, answer_follows)
    (["Cost of the notebooks: 2 * 5 = 10"], "10", 1, 1, None, True),
    (["Discount: 620 * 40 / 100 = 248", "Sale price: 620 - 248 = 372"], "372", 2, 2, None, True),
    (["40% of 620 = 248", "620 - 248 = 373"], "373", 2, 1, 2, True),
    (["9 x 9 = 899"], "899", 1, 0, 1, True),
    (["9 × 9 = 81", "81 ÷ 3 = 27"], "27", 2, 2, None, True),
    (["Distance in 5 hours: 60 * 5 = 300"], "30", 1, 1, None, False),  # right work, answer does not follow
    (["10 / 3 = 3.33"], "3.33", 1, 1, None, True),  # rounded to the places shown
    (["10 / 3 = 3.3"], "3.3", 1, 1, None, True),
    (["10 / 3 = 3"], "3", 1, 0, 1, True),  # an integer shows no rounding
    (["10 / 4 = 2.5"], "2.50", 1, 1, None, True),
    (["(2 + 3) * 4 = 20 = 20.0"], "20", 1, 1, None, True),  # a chain
    (["1,200 + 3 = 1,203", "$4 * 3 = $12"], "$12", 2, 2, None, True),
    (["620 * 40% = 248"], "248", 1, 1, None, True),
    (["248 / 620 = 40%"], "40%", 1, 1, None, True),
    (["Change: 50 - 36 = 14, then 14 + 1 = 16"], "16", 1, 0, 1, True),  # two claims, the second wrong
    (["-3 + 5 = 2"], "2", 1, 1, None, True),
    (["7 - 10 = -3"], "-3", 1, 1, None, True),
    (["20 / 0 = 10"], "10", 1, 0, 1, True),  # a division by zero is a false claim
    # Words end an expression: labels and units are never operands, and a side cut short is not checked.
    (["A cyclist rides 45 km in 5 hours", "45 km / 5 hours = 9 km per hour"], "9", 0, 0, None, None),
    (["5 hours * 60 = 300"], "300", 0, 0, None, None),
    (["The answer is Mara"], "Mara", 0, 0, None, None),
    (["Mara: 12 + 4 = 16", "Ben: 9 + 2 = 11", "Difference: 16 - 11 = 5"], "Mara", 3, 3, None, None),
    ([], "5", 0, 0, None, None),
]


@pytest.mark.parametrize("steps,answer,checked,valid,first_bad,follows", CASES)
def test_check_steps(steps, answer, checked, valid, first_bad, follows):
    result = check_steps(steps, answer)
    assert (result.steps_checked, result.steps_valid, result.first_bad_step, result.answer_follows) == (
        checked,
        valid,
        first_bad,
        follows,
    )
    assert result.work_valid == (first_bad is None and follows is not False)


def test_the_checker_finds_corrupted_numbers_and_never_flags_clean_traces():
    records = generate(1200, seed=11)
    rng = random.Random(0)
    clean = [check_steps([s["content"] for s in r["steps"]], r["final_answer"]) for r in records]
    assert all(
        c.work_valid and c.steps_checked == c.steps_valid == len(r["steps"])
        for c, r in zip(clean, records, strict=True)
    )
    found = sum(not check_steps(*corrupt_one_number(r, rng)).work_valid for r in records)
    assert found / len(records) >= 0.99
