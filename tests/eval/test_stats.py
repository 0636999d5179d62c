import pytest

from tracetune.eval.stats import bootstrap_interval, mcnemar_exact, paired_bootstrap, pass_at_k, wilson_interval


def test_wilson_known_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_bootstrap_brackets_the_difference_and_is_seeded():
    base = [False] * 60 + [True] * 40
    new = [True] * 30 + [False] * 30 + [True] * 40
    diff, low, high = paired_bootstrap(base, new, seed=1)
    assert diff == pytest.approx(0.3) and low < 0.3 < high and low > 0.15 and high < 0.45
    assert paired_bootstrap(base, new, seed=1) == (diff, low, high)


def test_mcnemar_exact():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_exact(3, 12) == pytest.approx(mcnemar_exact(12, 3))


@pytest.mark.parametrize(
    "n,c,k,expected",
    [(5, 0, 1, 0.0), (5, 5, 1, 1.0), (4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 2, 2, 1 - 1 / 6), (4, 3, 2, 1.0)],
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_bootstrap_interval_brackets_the_mean():
    values = [1.0] * 30 + [0.0] * 70
    low, high = bootstrap_interval(values)
    assert low < 0.3 < high and high - low < 0.25
    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)
