"""Checkers for the book's exercises: ``check_<name>(fn)`` tests a reader's function.

A right answer prints one success line; a wrong one raises ``AssertionError`` that names the
failing input, the expected and the received value, and the most likely mistake. Each chapter
group has its own module.
"""

from focalpo_mini.exercises.blind_spot import (
    check_accuracies,
    check_idealized_ranking,
    check_ranking_threshold,
)
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
from focalpo_mini.exercises.scratch import (
    check_detached_weight_peak,
    check_focal_direction_weight,
    check_focalpo_loss,
    check_gradient_weight,
    check_sequence_logps,
    check_sign_flip_probability,
)

__all__ = [
    "check_accuracies",
    "check_balanced_cross_entropy",
    "check_bt_gradient",
    "check_bt_nll",
    "check_bt_probability",
    "check_detached_weight_peak",
    "check_dpo_loss",
    "check_dpo_weight",
    "check_focal_direction_weight",
    "check_focal_gradient",
    "check_focal_loss",
    "check_focalpo_loss",
    "check_gradient_weight",
    "check_idealized_ranking",
    "check_implicit_reward",
    "check_optimal_policy",
    "check_ranking_threshold",
    "check_sequence_logps",
    "check_sign_flip_probability",
]
