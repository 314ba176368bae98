import math
import random

import pytest

from scoder_ray.evaluate.passk import mean_pass_at_k, pass_at_k


def reference(n, c, k):
    """The definition: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),  # c/n
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 0, 5, 0.0),
    (10, 10, 1, 1.0),
    (10, 3, 8, 1.0),  # n - c < k: every draw of 8 holds a correct one
    (4, 1, 4, 1.0),
    (200, 13, 100, 1.0 - math.comb(187, 100) / math.comb(200, 100)),
])
def test_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_the_reference_formula():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 120)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(reference(n, c, k), abs=1e-9)


def test_k_greater_than_n_is_an_error():
    with pytest.raises(ValueError, match="pass@11 needs k <= n"):
        pass_at_k(10, 3, 11)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_mean_over_problems_skips_ks_without_enough_samples():
    scores, skipped = mean_pass_at_k([(2, 1), (2, 0), (3, 3)], [1, 2, 10])
    assert scores["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert scores["pass@2"] == pytest.approx((1 + 0 + 1) / 3)
    assert skipped == [10]
