"""The chapter 5 and 6 checkers accept the package's answers and reject the usual wrong ones, each
with the hint that names the mistake."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from focalpo_mini.exercises import (
    check_detached_weight_peak,
    check_focal_direction_weight,
    check_focalpo_loss,
    check_gradient_weight,
    check_sequence_logps,
    check_sign_flip_probability,
)
from focalpo_mini.logprobs import sequence_logps
from focalpo_mini.losses import focalpo_loss, gradient_weight


def _rejects(checker, fn, hint: str) -> None:
    with pytest.raises(AssertionError) as info:
        checker(fn)
    message = str(info.value)
    assert "expected:" in message and "got:" in message
    assert hint in message.split("hint:")[1], message


# --- Chapter 5 ---------------------------------------------------------------------------------


def _focal_direction(z, *, gamma):
    return torch.exp(gamma * F.logsigmoid(-z)) * (
        torch.sigmoid(-z) - gamma * torch.sigmoid(z) * F.logsigmoid(z)
    )


def test_chapter5_checkers_accept_right_answers(capsys):
    check_sign_flip_probability(lambda gamma: math.exp(-1 / gamma))
    check_detached_weight_peak(lambda gamma: gamma / (1 + gamma))
    check_focal_direction_weight(_focal_direction)
    assert capsys.readouterr().out.count("✓") == 3


@pytest.mark.parametrize(("wrong", "hint"), [
    (lambda g: math.exp(-g), "ln p = -1/gamma"),
    (lambda g: 1 - math.exp(-1 / g), "that is 1 - p"),
    (lambda g: -1 / g - math.log(-math.expm1(-1 / g)), "that is the logit z"),
    (lambda g: 0.5, "find where the last factor is 0"),
])  # fmt: skip
def test_sign_flip_checker_names_the_mistake(wrong, hint):
    _rejects(check_sign_flip_probability, wrong, hint)


@pytest.mark.parametrize(("wrong", "hint"), [
    (lambda g: 1 / (1 + g), "that is 1 - p*"),
    (lambda g: math.log(g), "logit z* = ln(gamma)"),
    (lambda g: 0.5, "only for gamma = 1"),
    (lambda g: g / (2 + g), "differentiate p^g (1 - p)"),
])  # fmt: skip
def test_detached_peak_checker_names_the_mistake(wrong, hint):
    _rejects(check_detached_weight_peak, wrong, hint)


@pytest.mark.parametrize(("wrong", "hint"), [
    (lambda z, *, gamma: -_focal_direction(z, gamma=gamma), "wrong sign"),
    (lambda z, *, gamma: torch.sigmoid(-z) ** (gamma + 1), "the product rule adds"),
    (lambda z, *, gamma: torch.sigmoid(-z) ** gamma
     * (torch.sigmoid(-z) + gamma * torch.sigmoid(z) * F.logsigmoid(z)), "sign of the product"),
    (lambda z, *, gamma: gradient_weight(z, gamma=gamma), "that is FocalPO's weight"),
    (lambda z, *, gamma: (1 - torch.sigmoid(z)) ** gamma
     * ((1 - torch.sigmoid(z)) - gamma * torch.sigmoid(z) * torch.log(torch.sigmoid(z))),
     "log space"),
])  # fmt: skip
def test_focal_direction_checker_names_the_mistake(wrong, hint):
    _rejects(check_focal_direction_weight, wrong, hint)


# --- sequence_logps ------------------------------------------------------------------------------


def test_sequence_logps_checker_accepts_the_package(capsys):
    check_sequence_logps(sequence_logps)
    check_sequence_logps(lambda lg, lb, m: sequence_logps(lg, lb, m.bool()))
    assert capsys.readouterr().out.count("✓") == 2


def _gathered(logits, labels):
    return logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _no_shift(logits, labels, mask):
    return (_gathered(logits, labels) * mask).sum(1)


def _reverse_shift(logits, labels, mask):
    return (_gathered(logits[:, 1:], labels[:, :-1]) * mask[:, :-1]).sum(1)


def _mask_not_shifted(logits, labels, mask):
    return (_gathered(logits[:, :-1], labels[:, 1:]) * mask[:, :-1]).sum(1)


def _with_mask(mask_fn):
    """A correctly shifted sum that uses ``mask_fn(completion_mask)`` instead of the mask."""

    def fn(logits, labels, mask):
        return (_gathered(logits[:, :-1], labels[:, 1:]) * mask_fn(mask)[:, 1:]).sum(1)

    return fn


def _keep_prompt(mask):
    """Everything up to the last completion token: the reader masked padding, not the prompt."""
    return mask.flip(1).cummax(1).values.flip(1)


def _keep_padding(mask):
    """Everything from the first completion token on: the reader masked the prompt by length."""
    return mask.cummax(1).values


def _mean(logits, labels, mask):
    return sequence_logps(logits, labels, mask, average=True)


def _raw_logits(logits, labels, mask):
    picked = logits[:, :-1].gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (picked * mask[:, 1:]).sum(1)


@pytest.mark.parametrize(("wrong", "hint"), [
    (_no_shift, "off by one"),
    (_reverse_shift, "shifted the wrong way"),
    (_mask_not_shifted, "but not the mask"),
    (_with_mask(_keep_prompt), "the prompt tokens are not masked"),
    (_with_mask(_keep_padding), "the padding is not masked"),
    (_with_mask(torch.ones_like), "neither the prompt nor the padding is masked"),
    (_mean, "mean per token"),
    (lambda lg, lb, m: -sequence_logps(lg, lb, m), "wrong sign"),
    (_raw_logits, "raw logits are not log-probs"),
    (lambda lg, lb, m: sequence_logps(lg, lb, m)[:2], "shape (3,)"),
])  # fmt: skip
def test_sequence_logps_checker_names_the_mistake(wrong, hint):
    _rejects(check_sequence_logps, wrong, hint)


# --- focalpo_loss --------------------------------------------------------------------------------


def _focalpo(z_fn=None, *, factor=None, reduce=torch.mean, detach_rule=None, sign=1.0):
    """A reader's FocalPO loss with one part swapped out."""

    def fn(pc, pr, rc, rr, *, beta, gamma, detach_weight=False):
        z = beta * ((pc - rc) - (pr - rr)) if z_fn is None else z_fn(pc, pr, rc, rr, beta)
        log_p = F.logsigmoid(z)
        weight = torch.exp(gamma * log_p) if factor is None else factor(z, gamma)
        detach = detach_weight if detach_rule is None else detach_rule(detach_weight)
        if detach:
            weight = weight.detach()
        return sign * reduce(-weight * log_p)

    return fn


def _naive(pc, pr, rc, rr, *, beta, gamma, detach_weight=False):
    p = torch.sigmoid(beta * ((pc - rc) - (pr - rr)))
    weight = p**gamma
    if detach_weight:
        weight = weight.detach()
    return (-weight * torch.log(p)).mean()


def _naive_power(pc, pr, rc, rr, *, beta, gamma, detach_weight=False):
    """log p in log space, but p**gamma from sigmoid: finite loss, nan gradient at z = -1e4."""
    z = beta * ((pc - rc) - (pr - rr))
    weight = torch.sigmoid(z) ** gamma
    if detach_weight:
        weight = weight.detach()
    return (-weight * F.logsigmoid(z)).mean()


def _no_grad(pc, pr, rc, rr, **kwargs):
    return torch.tensor(focalpo_loss(pc, pr, rc, rr, **kwargs).item())


def test_focalpo_loss_checker_accepts_the_package(capsys):
    check_focalpo_loss(focalpo_loss)
    check_focalpo_loss(_focalpo())
    assert capsys.readouterr().out.count("✓") == 2


@pytest.mark.parametrize(("wrong", "hint"), [
    (_focalpo(sign=-1.0), "wrong sign"),
    (_focalpo(lambda pc, pr, rc, rr, b: b * (pc - pr)), "reference log-ratio is not subtracted"),
    (_focalpo(lambda pc, pr, rc, rr, b: (pc - rc) - (pr - rr)), "beta is missing"),
    (_focalpo(lambda pc, pr, rc, rr, b: b * ((pr - rr) - (pc - rc))), "swapped"),
    (_focalpo(factor=lambda z, g: torch.exp(g * F.logsigmoid(-z))), "(1 - p)**gamma"),
    (_focalpo(factor=lambda z, g: torch.ones_like(z)), "that is the DPO loss"),
    (_focalpo(reduce=torch.sum), "not the sum"),
    (_focalpo(detach_rule=lambda d: False), "p**gamma is not detached"),
    (_focalpo(detach_rule=lambda d: True), "though detach_weight=False"),
    (_naive, "log space"),
    (_naive_power, "gradient is not finite"),
    (_no_grad, "must stay differentiable"),
])  # fmt: skip
def test_focalpo_loss_checker_names_the_mistake(wrong, hint):
    _rejects(check_focalpo_loss, wrong, hint)


# --- gradient_weight -----------------------------------------------------------------------------


def _weight(form):
    """A reader's gradient weight ``form(p, log_p, one_minus_p, gamma, detach)``."""

    def fn(z, *, gamma, detach_weight=False):
        return form(torch.sigmoid(z), F.logsigmoid(z), torch.sigmoid(-z), gamma, detach_weight)

    return fn


def _stable(p, log_p, q, g, d):
    return torch.exp(g * log_p) * q * (1.0 if d else 1 + g * log_p)


def test_gradient_weight_checker_accepts_the_package(capsys):
    check_gradient_weight(gradient_weight)
    check_gradient_weight(_weight(_stable))
    assert capsys.readouterr().out.count("✓") == 2


@pytest.mark.parametrize(("wrong", "hint"), [
    (_weight(lambda p, lp, q, g, d: -_stable(p, lp, q, g, d)), "wrong sign"),
    (_weight(lambda p, lp, q, g, d: torch.exp(g * lp) * q), "(1 + gamma ln p) factor is missing"),
    (_weight(lambda p, lp, q, g, d: torch.exp(g * lp) * q * (1 + g * lp)), "is a constant"),
    (_weight(lambda p, lp, q, g, d: q**g * q * (1.0 if d else 1 + g * lp)), "focal loss's factor"),
    (_weight(lambda p, lp, q, g, d: torch.exp(g * lp) * q * (1.0 if d else 1 - g * lp)),
     "sign inside the product rule"),
    (_weight(lambda p, lp, q, g, d: torch.exp(g * lp) * (1.0 if d else 1 + g * lp)),
     "(1 - p) factor is missing"),
    (_weight(lambda p, lp, q, g, d: q), "gamma is ignored"),
    (_weight(lambda p, lp, q, g, d: p**g * (1 - p) * (1.0 if d else 1 + g * torch.log(p))),
     "log space"),
])  # fmt: skip
def test_gradient_weight_checker_names_the_mistake(wrong, hint):
    _rejects(check_gradient_weight, wrong, hint)


def test_gradient_weight_checker_rejects_the_gradient_with_respect_to_p():
    def wrong(z, *, gamma, detach_weight=False):
        log_p = F.logsigmoid(z)
        return torch.exp((gamma - 1) * log_p) * (1.0 if detach_weight else 1 + gamma * log_p)

    _rejects(check_gradient_weight, wrong, "that is -dL/dp")
