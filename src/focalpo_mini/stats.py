"""Comparing two training methods over seeds: paired differences, a bootstrap interval, a sign test.

Each seed gives one number per method (a win rate, say), computed from the same reference, data
and batch order, so the fair comparison is the per-seed difference. :func:`paired_comparison`
summarises those differences with their mean, a 95% percentile-bootstrap interval for the mean,
and an exact two-sided sign test (ties dropped), which assumes nothing about their distribution.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from focalpo_mini._checks import check_int, check_number


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p-value of ``wins`` against ``losses`` under "either is as likely" (ties
    are left out before calling). 1.0 when there is nothing to test."""
    for name, value in (("wins", wins), ("losses", losses)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    wins, losses = int(wins), int(losses)
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    tie: float = 1e-12,
) -> dict[str, float]:
    """How ``a`` differs from ``b``, seed by seed (``a[i]`` and ``b[i]`` share seed i).

    Returns ``mean`` (of a - b), ``low`` and ``high`` (a percentile-bootstrap interval for the
    mean at ``confidence``, from ``resamples`` resamples of the seeds drawn with ``seed``),
    ``wins``, ``losses``, ``ties`` (seeds where a is above, below, within ``tie`` of b), ``sign_p``
    (:func:`sign_test`) and ``n``.
    """
    a, b = _finite_vector("a", a), _finite_vector("b", b)
    confidence = check_number("confidence", confidence, minimum=0.0, inclusive=False, maximum=1.0)
    if confidence == 1.0:
        raise ValueError("confidence must be in (0, 1), got 1.0")
    resamples = check_int("resamples", resamples, 1, maximum=10**6)
    seed = check_int("seed", seed, 0)
    tie = check_number("tie", tie, minimum=0.0)
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a and b need the same length >= 2, got {len(a)} and {len(b)}")
    if not np.isfinite(a - b).all():
        raise ValueError("a - b overflows float64: the differences must be finite")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    wins, losses = int((diff > tie).sum()), int((diff < -tie).sum())
    return {
        "mean": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "wins": wins,
        "losses": losses,
        "ties": len(diff) - wins - losses,
        "sign_p": sign_test(wins, losses),
        "n": len(diff),
    }


def _finite_vector(name: str, values: object) -> np.ndarray:
    """``values`` as a 1-D float64 array of finite real numbers, or an error naming ``name``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must hold real numbers only: {error}") from error
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.isfinite(array).all():
        where = np.flatnonzero(~np.isfinite(array))[:5].tolist()
        raise ValueError(f"{name} must be finite, found NaN or inf at index {where}")
    return array
