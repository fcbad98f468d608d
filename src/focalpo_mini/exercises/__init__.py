"""Checkers for the book's exercises: ``check_<name>(fn)`` tests a reader's function.

A right answer prints one success line; a wrong one raises ``AssertionError`` that names the failing input,
the expected and the received value, and the most likely mistake. Each chapter group has its own module.
"""

from focalpo_mini.exercises.part1 import (
    check_balanced_cross_entropy,
    check_bt_gradient,
    check_bt_nll,
    check_bt_probability,
    check_dpo_loss,
    check_dpo_weight,
    check_focal_gradient,
    check_focal_loss,
    check_implicit_reward,
    check_optimal_policy,
)

__all__ = [
    "check_balanced_cross_entropy",
    "check_bt_gradient",
    "check_bt_nll",
    "check_bt_probability",
    "check_dpo_loss",
    "check_dpo_weight",
    "check_focal_gradient",
    "check_focal_loss",
    "check_implicit_reward",
    "check_optimal_policy",
]
