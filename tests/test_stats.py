"""Paired comparisons over seeds: the sign test against a direct binomial sum, the interval."""

import math

import numpy as np
import pytest

from focalpo_mini.stats import paired_comparison, sign_test


def test_sign_test_against_the_binomial_distribution():
    # 9 of 10: P(X <= 1) + P(X >= 9) for X ~ Bin(10, 1/2) = 22 / 1024
    assert sign_test(9, 1) == pytest.approx(22 / 1024)
    assert sign_test(1, 9) == sign_test(9, 1)
    assert sign_test(5, 5) == 1.0
    assert sign_test(0, 0) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    for wins in range(0, 13):
        losses = 12 - wins
        k = min(wins, losses)
        direct = sum(math.comb(12, j) for j in range(13) if j <= k or j >= 12 - k) / 2**12
        assert sign_test(wins, losses) == pytest.approx(min(1.0, direct))


def test_sign_test_refuses_bad_counts():
    with pytest.raises(ValueError, match="wins"):
        sign_test(-1, 3)
    with pytest.raises(ValueError, match="losses"):
        sign_test(2, 1.5)


def test_paired_comparison_counts_and_interval():
    a = [0.6, 0.55, 0.52, 0.58, 0.5, 0.61, 0.57, 0.54, 0.59, 0.56]
    b = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    out = paired_comparison(a, b)
    assert out["mean"] == pytest.approx(np.mean(a) - 0.5)
    assert (out["wins"], out["losses"], out["ties"], out["n"]) == (9, 0, 1, 10)
    assert out["sign_p"] == pytest.approx(2 / 512)
    assert 0.0 < out["low"] < out["mean"] < out["high"]


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        d = rng.normal(0.3, 1.0, size=30)
        out = paired_comparison(d, np.zeros(30), resamples=1000, seed=trial)
        covered += out["low"] <= 0.3 <= out["high"]
    assert 0.88 <= covered / 200 <= 0.99  # the percentile bootstrap runs a little narrow at n=30


def test_paired_comparison_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_comparison([1.0, 2.0], [1.0, 1.0], confidence=1.5)
