"""Ranking accuracy, Chen et al.'s theorem and groups, against naive loops and the DPO loss."""

import math

import pytest
import torch

from focalpo_mini.losses import dpo_loss, gradient_weight
from focalpo_mini.ranking import (
    GROUPS,
    gradient_share,
    idealized_ranked_correctly,
    idealized_ranking_accuracy,
    ranked_correctly,
    ranking_accuracy,
    ranking_groups,
    ranking_threshold,
)


def _random_pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


def test_ranking_accuracy_matches_a_loop_and_counts_ties_as_correct():
    chosen = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    rejected = torch.tensor([-2.0, -2.0, -1.0, -5.0])
    expected = sum(c >= r for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)) / 4
    assert ranking_accuracy(chosen, rejected) == expected == 0.75
    assert ranked_correctly(chosen, rejected).tolist() == [True, True, False, True]


def test_ranking_accuracy_differs_from_reward_accuracy():
    # The policy prefers y_l in absolute terms, but has moved y_w up relative to the reference.
    pc, pr = torch.tensor([-10.0]), torch.tensor([-8.0])
    rc, rr = torch.tensor([-14.0]), torch.tensor([-8.0])
    assert ranking_accuracy(pc, pr) == 0.0
    assert bool(0.1 * ((pc - rc) - (pr - rr)) > 0)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_theorem_ranked_correctly_iff_dpo_loss_below_threshold(beta):
    pc, pr, rc, rr = _random_pairs(2000, seed=1)
    loss = dpo_loss(pc, pr, rc, rr, beta=beta, reduction="none")
    threshold = ranking_threshold(rc, rr, beta=beta)
    correct = ranked_correctly(pc, pr)
    # Leave out pairs within rounding of the boundary, where float64 may disagree with itself.
    clear = (loss - threshold).abs() > 1e-9
    assert clear.float().mean() > 0.99
    assert torch.equal((loss <= threshold)[clear], correct[clear])


def test_ranking_threshold_closed_form():
    rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-5.0, -3.0])
    got = ranking_threshold(rc, rr, beta=0.5)
    expected = [
        math.log1p(math.exp(-0.5 * (r - c)))
        for c, r in zip([-3.0, -5.0], [-5.0, -3.0], strict=True)
    ]
    assert got.tolist() == pytest.approx(expected)
    assert got[0] > math.log(2) > got[1]


def test_idealized_ranking_matches_the_optimal_policy_formula():
    _, _, rc, rr = _random_pairs(500, seed=2)
    alpha = torch.rand(500, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha = alpha.clamp(0.01, 0.99)
    beta = 0.3
    expected = [
        math.exp(c - r) * (a / (1 - a)) ** (1 / beta) > 1
        for c, r, a in zip(rc.tolist(), rr.tolist(), alpha.tolist(), strict=True)
    ]
    got = idealized_ranked_correctly(rc, rr, alpha, beta=beta)
    assert got.tolist() == expected
    assert idealized_ranking_accuracy(rc, rr, alpha, beta=beta) == sum(expected) / 500


def test_idealized_ranking_with_scalar_alpha_one_half_is_the_reference_ranking():
    _, _, rc, rr = _random_pairs(300, seed=4)
    assert torch.equal(idealized_ranked_correctly(rc, rr, 0.5, beta=0.1), rc > rr)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.2, 1.5])
def test_idealized_ranking_rejects_alpha_outside_open_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        idealized_ranked_correctly(torch.zeros(2), torch.zeros(2), alpha, beta=0.1)
    with pytest.raises(ValueError, match="alpha"):
        idealized_ranked_correctly(
            torch.zeros(2), torch.zeros(2), torch.full((2,), alpha), beta=0.1
        )


def test_ranking_groups_match_counting():
    ref = torch.tensor([True, True, False, False, False, True])
    now = torch.tensor([True, False, True, False, False, True])
    table = ranking_groups(ref, now)
    assert table[GROUPS[0]] == 2 / 6
    assert table[GROUPS[1]] == 1 / 6
    assert table[GROUPS[2]] == 1 / 6
    assert table[GROUPS[3]] == 2 / 6
    assert table["flip_rate"] == 1 / 3
    assert math.isnan(ranking_groups(torch.tensor([True]), torch.tensor([False]))["flip_rate"])


def test_ranking_groups_rejects_non_bool_and_mismatched_shapes():
    with pytest.raises(TypeError, match="ref_correct"):
        ranking_groups(torch.tensor([1, 0]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="same shape"):
        ranking_groups(torch.tensor([True]), torch.tensor([True, False]))


@pytest.mark.parametrize(
    ("gamma", "detach"), [(0.0, False), (0.5, False), (2.0, False), (1.0, True)]
)
def test_gradient_share_matches_autograd(gamma, detach):
    from focalpo_mini.losses import focalpo_loss

    g = torch.Generator().manual_seed(5)
    z = 4 * torch.randn(64, generator=g, dtype=torch.float64)
    group = torch.rand(64, generator=g) < 0.3
    zz = z.clone().requires_grad_()
    zero = torch.zeros_like(z)
    # With beta = 1 and all log-probs but one zero, the loss's logit is exactly zz.
    focalpo_loss(
        zz, zero, zero, zero, beta=1.0, gamma=gamma, detach_weight=detach, reduction="sum"
    ).backward()
    mass = zz.grad.abs()
    assert gradient_share(z, group, gamma=gamma, detach_weight=detach) == pytest.approx(
        (mass[group].sum() / mass.sum()).item()
    )
    assert torch.allclose(gradient_weight(z, gamma=gamma, detach_weight=detach).abs(), mass)


def test_gradient_share_at_zero_logits_is_the_group_fraction():
    group = torch.tensor([True, False, False, False])
    assert gradient_share(torch.zeros(4), group) == pytest.approx(0.25)
