"""Part I exercise checkers: each accepts a right answer with one line and rejects the common
wrong answers with the hint for that mistake. The answers below are written as a reader would
write them, independently of the checkers' own references."""

import math

import pytest
import torch
import torch.nn.functional as F

from focalpo_mini import exercises
from focalpo_mini.exercises import part1
from focalpo_mini.losses import dpo_loss, focal_loss, gradient_weight

# --- right answers ----------------------------------------------------------------------------


def balanced_ce(x, y, alpha):
    return focal_loss(x, y, gamma=0.0, alpha=alpha, reduction="none")


def focal(x, y, gamma, alpha):
    return focal_loss(x, y, gamma=gamma, alpha=alpha, reduction="none")


def focal_grad_autograd(x, y, gamma):
    x = x.clone().requires_grad_(True)
    focal_loss(x, y, gamma=gamma, alpha=None, reduction="sum").backward()
    return x.grad


def bt_prob(ri, rj):
    return torch.sigmoid(ri - rj)


def bt_nll(r, w, v):
    return -F.logsigmoid(r[w] - r[v]).mean()


def bt_grad_autograd(r, w, v):
    r = r.clone().requires_grad_(True)
    bt_nll(r, w, v).backward()
    return r.grad


def optimal_policy(ref, r, beta):
    logits = torch.log(ref) + r / beta
    return torch.exp(logits - torch.logsumexp(logits, 0))


def implicit_reward(pol, ref, beta):
    return beta * (pol - ref)


def dpo(pc, pr, rc, rr, beta):
    return dpo_loss(pc, pr, rc, rr, beta=beta, reduction="none")


def dpo_weight(z):
    return gradient_weight(z, gamma=0.0)


RIGHT = [
    (part1.check_balanced_cross_entropy, balanced_ce, "balanced_cross_entropy"),
    (part1.check_focal_loss, focal, "focal_loss"),
    (part1.check_focal_gradient, focal_grad_autograd, "focal_gradient"),
    (part1.check_bt_probability, bt_prob, "bt_probability"),
    (part1.check_bt_nll, bt_nll, "bt_nll"),
    (part1.check_bt_gradient, bt_grad_autograd, "bt_gradient"),
    (part1.check_optimal_policy, optimal_policy, "optimal_policy"),
    (part1.check_implicit_reward, implicit_reward, "implicit_reward"),
    (part1.check_dpo_loss, dpo, "dpo_loss"),
    (part1.check_dpo_weight, dpo_weight, "dpo_weight"),
]


@pytest.mark.parametrize(("checker", "answer", "name"), RIGHT, ids=[r[2] for r in RIGHT])
def test_right_answer_prints_one_success_line(checker, answer, name, capsys):
    checker(answer)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"✓ {name}: correct."]


def test_checkers_are_exported():
    for checker, _, _ in RIGHT:
        assert getattr(exercises, checker.__name__) is checker


# --- wrong answers ----------------------------------------------------------------------------


def _p_t(x, y):
    p = torch.sigmoid(x)
    return torch.where(y.bool(), p, 1 - p)


def _alpha_t(y, alpha):
    return torch.where(y.bool(), alpha, 1 - alpha)


def focal_grad_closed(x, y, gamma):
    """Lin et al.'s appendix form, y in {-1, +1}: y (1 - p_t)^g (g p_t log p_t + p_t - 1)."""
    pt = _p_t(x, y).clamp_min(1e-300)
    sign = 2 * y - 1
    return sign * (1 - pt) ** gamma * (gamma * pt * torch.log(pt) + pt - 1)


WRONG = [
    # chapter 1
    (part1.check_balanced_cross_entropy, lambda x, y, a: balanced_ce(x, y, a) * -1, "wrong sign"),
    (
        part1.check_balanced_cross_entropy,
        lambda x, y, a: F.binary_cross_entropy_with_logits(x, y, reduction="none"),
        "alpha_t is missing",
    ),
    (part1.check_balanced_cross_entropy, lambda x, y, a: balanced_ce(x, y, 1 - a), "swapped"),
    (
        part1.check_balanced_cross_entropy,
        lambda x, y, a: a * F.binary_cross_entropy_with_logits(x, y, reduction="none"),
        "you multiplied every example by alpha",
    ),
    (
        part1.check_balanced_cross_entropy,
        lambda x, y, a: -_alpha_t(y, a) * torch.log(_p_t(x, y)),
        "overflowed",
    ),
    (part1.check_focal_loss, lambda x, y, g, a: -focal(x, y, g, a), "wrong sign"),
    (
        part1.check_focal_loss,
        lambda x, y, g, a: (
            -_alpha_t(y, a)
            * torch.sigmoid(torch.where(y.bool(), x, -x)) ** g
            * F.logsigmoid(torch.where(y.bool(), x, -x))
        ),
        "you used p_t where 1 - p_t belongs",
    ),
    (
        part1.check_focal_loss,
        lambda x, y, g, a: focal_loss(x, y, gamma=g, alpha=None, reduction="none"),
        "alpha_t is missing",
    ),
    (part1.check_focal_loss, lambda x, y, g, a: focal(x, y, g, 1 - a), "swapped"),
    (
        part1.check_focal_loss,
        lambda x, y, g, a: a * focal_loss(x, y, gamma=g, alpha=None, reduction="none"),
        "you multiplied every example by alpha",
    ),
    (
        part1.check_focal_loss,
        lambda x, y, g, a: (
            -_alpha_t(y, a)
            * (1 - torch.sigmoid(x)) ** g
            * F.logsigmoid(torch.where(y.bool(), x, -x))
        ),
        "for target 0 it must be 1 - p_t = p",
    ),
    (part1.check_focal_gradient, lambda x, y, g: -focal_grad_closed(x, y, g), "wrong sign"),
    (
        part1.check_focal_gradient,
        lambda x, y, g: (2 * y - 1) * -((1 - _p_t(x, y)) ** (g + 1)),
        "treated (1 - p_t)**gamma as a constant",
    ),
    (
        part1.check_focal_gradient,
        lambda x, y, g: (2 * y - 1) * focal_grad_closed(x, y, g),
        "the chain rule flips the sign",
    ),
    # chapter 2
    (part1.check_bt_probability, lambda a, b: torch.sigmoid(b - a), "wrong sign"),
    (part1.check_bt_probability, lambda a, b: a / (a + b), "rewards are log-strengths"),
    (
        part1.check_bt_probability,
        lambda a, b: torch.exp(a) / (torch.exp(a) + torch.exp(b)),
        "overflowed",
    ),
    (part1.check_bt_nll, lambda r, w, v: F.logsigmoid(r[w] - r[v]).mean(), "wrong sign"),
    (part1.check_bt_nll, lambda r, w, v: -F.logsigmoid(r[v] - r[w]).mean(), "swapped"),
    (part1.check_bt_nll, lambda r, w, v: -F.logsigmoid(r[w] - r[v]).sum(), "take the mean"),
    (
        part1.check_bt_nll,
        lambda r, w, v: -torch.log(torch.sigmoid(r[w] - r[v])).mean(),
        "overflowed",
    ),
    (part1.check_bt_gradient, lambda r, w, v: -bt_grad_autograd(r, w, v), "wrong sign"),
    (
        part1.check_bt_gradient,
        lambda r, w, v: (
            torch.zeros_like(r)
            .index_add(0, w, -torch.sigmoid(r[w] - r[v]) / len(w))
            .index_add(0, v, torch.sigmoid(r[w] - r[v]) / len(w))
        ),
        "you used p where 1 - p belongs",
    ),
    (
        part1.check_bt_gradient,
        lambda r, w, v: torch.zeros_like(r).index_add(0, w, -torch.sigmoid(r[v] - r[w]) / len(w)),
        "the loser's term is missing",
    ),
    (part1.check_bt_gradient, lambda r, w, v: bt_grad_autograd(r, w, v) * len(w), "not the mean"),
    # chapter 3
    (
        part1.check_optimal_policy,
        lambda p, r, b: torch.softmax(torch.log(p) + b * r, 0),
        "beta divides the reward",
    ),
    (part1.check_optimal_policy, lambda p, r, b: torch.softmax(r / b, 0), "pi_ref is missing"),
    (part1.check_optimal_policy, lambda p, r, b: p * torch.exp(r / b), "not normalised"),
    (
        part1.check_optimal_policy,
        lambda p, r, b: torch.softmax(torch.log(p) - r / b, 0),
        "wrong sign",
    ),
    (
        part1.check_optimal_policy,
        lambda p, r, b: p * torch.exp(r / b) / (p * torch.exp(r / b)).sum(),
        "overflowed",
    ),
    (part1.check_implicit_reward, lambda a, b, c: c * a, "reference log-prob is not subtracted"),
    (part1.check_implicit_reward, lambda a, b, c: a - b, "beta is missing"),
    (part1.check_implicit_reward, lambda a, b, c: c * (b - a), "wrong sign"),
    (part1.check_implicit_reward, lambda a, b, c: (a - b) / c, "do not divide"),
    (part1.check_dpo_loss, lambda a, b, c, d, e: -dpo(a, b, c, d, e), "wrong sign"),
    (part1.check_dpo_loss, lambda a, b, c, d, e: dpo(b, a, d, c, e), "swapped"),
    (
        part1.check_dpo_loss,
        lambda a, b, c, d, e: -F.logsigmoid(e * (a - b)),
        "reference log-ratio is not subtracted",
    ),
    (part1.check_dpo_loss, lambda a, b, c, d, e: dpo(a, b, c, d, 1.0), "beta is missing"),
    (
        part1.check_dpo_loss,
        lambda a, b, c, d, e: -torch.log(torch.sigmoid(e * ((a - c) - (b - d)))),
        "overflowed",
    ),
    (part1.check_dpo_weight, torch.sigmoid, "you used p where 1 - p belongs"),
    (part1.check_dpo_weight, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)), "dp/dz"),
    (part1.check_dpo_weight, lambda z: torch.sigmoid(z) - 1, "its negative"),
]


@pytest.mark.parametrize(("checker", "answer", "hint"), WRONG, ids=[w[2] for w in WRONG])
def test_wrong_answer_is_rejected_with_its_hint(checker, answer, hint, capsys):
    with pytest.raises(AssertionError) as info:
        checker(answer)
    message = str(info.value)
    assert hint in message
    assert "expected:" in message and "got:" in message and "failed on" in message
    assert capsys.readouterr().out == ""


def test_an_exception_in_the_answer_is_reported_with_its_input():
    def broken(x, y, a):
        raise RuntimeError("boom")

    with pytest.raises(AssertionError, match="RuntimeError: boom"):
        part1.check_balanced_cross_entropy(broken)


def test_a_wrong_shape_is_reported():
    with pytest.raises(AssertionError, match="shape"):
        part1.check_bt_nll(lambda r, w, v: -F.logsigmoid(r[w] - r[v]))


def test_focal_gradient_closed_form_matches_autograd():
    x = torch.linspace(-8, 8, 33, dtype=torch.float64)
    y = (torch.arange(33) % 2).to(torch.float64)
    for gamma in (0.0, 0.5, 2.0):
        torch.testing.assert_close(focal_grad_closed(x, y, gamma), focal_grad_autograd(x, y, gamma))


def test_optimal_policy_reference_is_a_distribution_that_tilts_toward_reward():
    ref = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    pi = optimal_policy(ref, r, 1.0)
    assert math.isclose(pi.sum().item(), 1.0)
    assert pi[0] / pi[1] == pytest.approx(math.e)
