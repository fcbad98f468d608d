"""Checkers for Part II's FocalPO chapters: its gradients (chapter 5) and FocalPO from scratch (6).

Each ``check_<name>(fn)`` calls the reader's ``fn`` on fresh copies of crafted float64 inputs,
extremes included, and compares it with the package (:mod:`focalpo_mini.losses`,
:mod:`focalpo_mini.logprobs`). When an answer is wrong, the checker evaluates the usual wrong
answers on the same input and names the one the reader's output matches; the loss checker also
compares gradients, which is the only way to tell a detached factor from one left in the graph. It
never reads source code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from focalpo_mini.exercises._check import (
    LOW_PRECISION,
    call,
    failed,
    low_precision_close,
    passed,
    precision_hint,
    read_float,
    read_tensor,
)
from focalpo_mini.logprobs import sequence_logps
from focalpo_mini.losses import focal_loss, focalpo_loss, gradient_weight

_Mistake = tuple[torch.Tensor, str]

_LOG_SPACE_HINT = (
    "your output is not finite where the answer is: sigmoid(z) underflows to 0 at z = -1e4, and "
    "0 * log(0) is nan. Work in log space: log p = F.logsigmoid(z), p**gamma = "
    "exp(gamma * F.logsigmoid(z)), 1 - p = exp(F.logsigmoid(-z))."
)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float | None = None) -> bool:
    """Equal to float64 precision, or within an absolute ``atol`` when one is given."""
    rtol, atol = (1e-5, 1e-8) if atol is None else (0.0, atol)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))


def _show(x: torch.Tensor) -> str:
    return str([round(v, 6) for v in x.flatten().tolist()]) if x.dim() else f"{x.item():.6g}"


def _as_tensor(
    name: str, case: str, raw: object, expected: torch.Tensor
) -> tuple[torch.Tensor, torch.dtype]:
    """The reader's output as a float64 CPU tensor of the expected shape, and its dtype."""
    got, dtype = read_tensor(name, case, _show(expected), raw)
    if got.shape != expected.shape:
        hint = f"return a tensor of shape {tuple(expected.shape)}, not {tuple(got.shape)}."
        failed(name, case, _show(expected), _show(got), hint)
    return got, dtype


def _as_float(name: str, case: str, raw: object, expected: torch.Tensor):
    """The reader's output as a 0-dim float64 tensor, and its dtype; it must be one number."""
    return read_float(name, case, _show(expected), raw)


def _call(name: str, case: str, fn: Callable[..., Any], expected: torch.Tensor, *args, **kwargs):
    """The reader's ``fn`` called on fresh copies of ``args``, or a failure that says why not."""
    return call(name, case, _show(expected), fn, *args, **kwargs)


def _diagnose(
    name: str,
    case: str,
    got: torch.Tensor,
    expected: torch.Tensor,
    mistakes: Sequence[_Mistake],
    generic_hint: str,
    dtype: torch.dtype = torch.float64,
    atol: float | None = None,
) -> None:
    """Fail with the hint of the first mistake ``got`` matches, unless ``got`` is right.

    ``dtype`` is the dtype the reader computed in: a bfloat16 or float16 answer that is right to
    that precision gets a precision hint. ``atol`` accepts a numerical answer within it.
    """
    if _close(got, expected, atol):
        return
    low = dtype in LOW_PRECISION
    if low and low_precision_close(got, expected, dtype):
        failed(name, case, _show(expected), f"{_show(got)} ({dtype})", precision_hint(dtype))

    def same(wrong: torch.Tensor) -> bool:
        return low_precision_close(got, wrong, dtype) if low else _close(got, wrong, atol)

    hint = next((h for wrong, h in mistakes if same(wrong)), None)
    if hint is None:
        overflow = bool(torch.isfinite(expected).all()) and not bool(torch.isfinite(got).all())
        hint = _LOG_SPACE_HINT if overflow else generic_hint
    if low:
        hint += f" (Your answer is also in {dtype}: compute in float64.)"
    failed(name, case, _show(expected), _show(got), hint)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _s(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


# --- Chapter 5: the gradient of FocalPO and of the focal direction ---------------------------


NUMERICAL_TOLERANCE = 1e-3
"""How far from the exact p a numerical answer (a grid search, a root finder) may be."""


def check_sign_flip_probability(fn: Callable[[float], float]) -> None:
    """Check ``fn(gamma)``: the p below which the in-graph FocalPO gradient changes sign.

    ``fn`` returns a float. A closed form or a numerical answer (a grid search, bisection) is
    accepted within ``NUMERICAL_TOLERANCE`` = 1e-3 of the exact p.
    """
    name = "sign_flip_probability"
    for gamma in (0.25, 0.5, 1.0, 2.0, 5.0):
        expected = _s(math.exp(-1.0 / gamma))
        case = f"gamma={gamma}"
        got, dtype = _as_float(name, case, _call(name, case, fn, expected, gamma), expected)
        mistakes = [
            (_s(math.exp(-gamma)), "solve 1 + gamma ln p = 0 for p: ln p = -1/gamma."),
            (
                _s(1 - math.exp(-1.0 / gamma)),
                "that is 1 - p: the flip is at p = exp(-1/gamma) itself.",
            ),
            (
                _s(-1.0 / gamma - math.log(-math.expm1(-1.0 / gamma))),
                "that is the logit z at the flip; the question asks for p = sigmoid(z).",
            ),
        ]
        hint = _numerical_hint(
            got,
            expected,
            "the in-graph weight is p^g (1-p)(1 + g ln p); find where the last factor is 0.",
        )
        _diagnose(name, case, got, expected, mistakes, hint, dtype, NUMERICAL_TOLERANCE)
    passed(name)


def check_detached_weight_peak(fn: Callable[[float], float]) -> None:
    """Check ``fn(gamma)``: the p at which the detached weight p**gamma (1 - p) is largest.

    ``fn`` returns a float. A closed form or a numerical answer (a grid search over p) is
    accepted within ``NUMERICAL_TOLERANCE`` = 1e-3 of the exact p.
    """
    name = "detached_weight_peak"
    for gamma in (0.25, 0.5, 1.0, 2.0, 5.0):
        expected = _s(gamma / (1.0 + gamma))
        case = f"gamma={gamma}"
        got, dtype = _as_float(name, case, _call(name, case, fn, expected, gamma), expected)
        mistakes = [
            (
                _s(1.0 / (1.0 + gamma)),
                "that is 1 - p*: set d/dp [p^g (1-p)] = p^(g-1) (g - (1+g) p) to 0, solve for p.",
            ),
            (
                _s(math.log(gamma)),
                "that is the logit z* = ln(gamma) of the peak; return p* = sigmoid(z*).",
            ),
            (_s(0.5), "the peak moves with gamma: it is at p = 1/2 only for gamma = 1."),
        ]
        hint = _numerical_hint(
            got, expected, "differentiate p^g (1 - p) with respect to p, set it to 0 and solve."
        )
        _diagnose(name, case, got, expected, mistakes, hint, dtype, NUMERICAL_TOLERANCE)
    passed(name)


def _numerical_hint(got: torch.Tensor, expected: torch.Tensor, formula_hint: str) -> str:
    """The formula hint, or, for an answer near the right p, how near it must be."""
    off = abs(got.item() - expected.item())
    if off < 0.05:
        return (
            f"close, but {off:.2g} away: a numerical answer (grid search, bisection) is accepted "
            f"within {NUMERICAL_TOLERANCE:g} of the exact p; refine it, or solve exactly."
        )
    return formula_hint


def _focal_direction(z: torch.Tensor, gamma: float) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    loss = focal_loss(z, torch.ones_like(z), gamma=gamma, alpha=None, reduction="sum")
    return -torch.autograd.grad(loss, z)[0]


def check_focal_direction_weight(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(z, *, gamma)``: the weight w in dL/dz = -w of L = -(1 - p)**gamma log p."""
    name = "focal_direction_weight"
    cases = [
        (_t(-6.0, -2.0, -0.5, 0.0, 0.5, 2.0, 6.0), 0.5),
        (_t(-6.0, -2.0, -0.5, 0.0, 0.5, 2.0, 6.0), 2.0),
        (_t(-1e4, -50.0, 50.0, 1e4), 2.0),
    ]
    for z, gamma in cases:
        case = f"z={_show(z)}, gamma={gamma}"
        expected = _focal_direction(z, gamma)
        raw = _call(name, case, fn, expected, z, gamma=gamma)
        got, dtype = _as_tensor(name, case, raw, expected)
        p, log_p = torch.sigmoid(z), F.logsigmoid(z)
        mistakes = [
            (-expected, "wrong sign: w is minus the gradient, and it is >= 0 here."),
            (
                (1 - p) ** gamma * (1 - p),
                "the factor (1-p)^g depends on z too: the product rule adds -g p log p inside.",
            ),
            (
                (1 - p) ** gamma * ((1 - p) + gamma * p * log_p),
                "sign of the product-rule term: d(1-p)^g/dz = -g p (1-p)^g, times -log p.",
            ),
            (
                gradient_weight(z, gamma=gamma),
                "that is FocalPO's weight (factor p^g); focal loss's factor is (1-p)^g.",
            ),
        ]
        hint = "w = (1-p)^g [(1-p) - g p ln p]; check dp/dz = p(1-p) and d(1-p)^g/dz."
        _diagnose(name, case, got, expected, mistakes, hint, dtype)
    passed(name)


# --- Chapter 6: sequence log-probs, the FocalPO loss, its gradient weight ---------------------

_PAD = 0


def _logps_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows of 8 tokens, vocabulary 6: prompts of 2, 3 and 1 tokens; right padding."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 6, generator=generator, dtype=torch.float64) * 2.0
    labels = torch.randint(1, 6, (3, 8), generator=generator)
    mask = torch.tensor(
        [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0]]
    )
    labels = labels.masked_fill(mask.flip(1).cummax(1).values.flip(1) == 0, _PAD)
    return logits, labels, mask


def _token_sum(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of scores[b, t, labels[b, t]] where mask is 1; all three aligned already."""
    picked = scores.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


def _shifted(logits, labels, mask, *, scores=None) -> torch.Tensor:
    scores = logits.log_softmax(-1) if scores is None else scores
    return _token_sum(scores[:, :-1], labels[:, 1:], mask[:, 1:])


def check_sequence_logps(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(logits, labels, completion_mask)``: summed completion log-probs, shape ``(B,)``.

    The batch has prompts of different lengths, right padding with token id 0 (whose logits are
    not zero), and completion tokens that are not the most likely ones.
    """
    name = "sequence_logps"
    logits, labels, mask = _logps_batch()
    case = "3 rows: prompts of 2, 3, 1 tokens, completions of 3, 5, 2, right padding"
    expected = sequence_logps(logits, labels, mask)
    raw = _call(name, case, fn, expected, logits, labels, mask)
    got, dtype = _as_tensor(name, case, raw, expected)
    logp = logits.log_softmax(-1)
    started = mask.cummax(1).values  # 1 from the first completion token on, padding included
    not_padding = mask.flip(1).cummax(1).values.flip(1)  # 1 up to the last completion token
    everything = torch.ones_like(mask)
    mistakes = [
        (-expected, "wrong sign: a log-probability is <= 0; return log p, not -log p."),
        (
            _token_sum(logp, labels, mask),
            "off by one: the logits at position t-1 predict token t. Score labels[:, 1:] with "
            "logits[:, :-1] and mask[:, 1:].",
        ),
        (
            _token_sum(logp[:, 1:], labels[:, :-1], mask[:, :-1]),
            "shifted the wrong way: drop the LAST logit position and the FIRST label position.",
        ),
        (
            _token_sum(logp[:, :-1], labels[:, 1:], mask[:, :-1]),
            "you shifted labels and logits but not the mask: use completion_mask[:, 1:].",
        ),
        (
            _shifted(logits, labels, everything),
            "neither the prompt nor the padding is masked: sum only where completion_mask is 1.",
        ),
        (
            _shifted(logits, labels, not_padding),
            "the prompt tokens are not masked: log pi(y|x) scores the completion y only.",
        ),
        (
            _shifted(logits, labels, started),
            "the padding is not masked: padding after the completion must not count.",
        ),
        (
            expected / mask[:, 1:].sum(1),
            "that is the mean per token; DPO uses the sum over completion tokens.",
        ),
        (
            _shifted(logits, labels, mask, scores=logits),
            "raw logits are not log-probs: take log_softmax over the vocabulary first.",
        ),
        (
            _shifted(logits, labels, mask, scores=logits.softmax(-1)),
            "those are probabilities; sum LOG-probabilities (log_softmax).",
        ),
    ]
    hint = "gather log_softmax(logits[:, :-1]) at labels[:, 1:], multiply by mask[:, 1:], sum."
    _diagnose(name, case, got, expected, mistakes, hint, dtype)
    passed(name)


def _pairs() -> tuple[torch.Tensor, ...]:
    """Five pairs whose margins h cover misranked, tied and correctly ranked pairs."""
    policy_chosen = _t(-12.0, -20.0, -7.5, -30.0, -15.0)
    policy_rejected = _t(-14.0, -11.0, -7.5, -26.0, -40.0)
    ref_chosen = _t(-13.0, -16.0, -8.0, -29.0, -17.0)
    ref_rejected = _t(-12.5, -14.0, -8.0, -20.0, -30.0)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def _extreme_pairs() -> tuple[torch.Tensor, ...]:
    """Two pairs with z = -1e4 and z = +1e4 at beta = 0.1."""
    return _t(-1e5, 0.0), _t(0.0, -1e5), _t(0.0, 0.0), _t(0.0, 0.0)


def _focalpo_from_z(z: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (-factor * F.logsigmoid(z)).mean()


def check_focalpo_loss(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(pc, pr, rc, rr, *, beta, gamma, detach_weight=False)``: the mean FocalPO loss.

    ``pc, pr`` are the policy's chosen and rejected log-probs, ``rc, rr`` the reference's, each of
    shape ``(B,)``. Compares values, then gradients with respect to ``pc`` in both detach modes.
    """
    name = "focalpo_loss"
    settings = [
        (_pairs, 0.1, 0.5),
        (_pairs, 0.5, 2.0),
        (_pairs, 0.1, 0.0),
        (_extreme_pairs, 0.1, 0.5),
    ]
    for make, beta, gamma in settings:
        for detach in (False, True):
            pc, pr, rc, rr = make()
            case = (
                f"pc={_show(pc)}, pr={_show(pr)}, rc={_show(rc)}, rr={_show(rr)}, beta={beta}, "
                f"gamma={gamma}, detach_weight={detach}"
            )
            kwargs = {"beta": beta, "gamma": gamma, "detach_weight": detach}
            expected = focalpo_loss(pc, pr, rc, rr, **kwargs)
            raw = _call(name, case, fn, expected, pc, pr, rc, rr, **kwargs)
            got, dtype = _as_tensor(name, case, raw, expected)
            mistakes = _loss_mistakes(pc, pr, rc, rr, beta, gamma)
            _diagnose(name, case, got, expected, mistakes, _LOSS_HINT, dtype)
            _check_loss_gradient(name, case, fn, make, beta, gamma, detach)
    passed(name)


_LOSS_HINT = (
    "z = beta * ((pc - rc) - (pr - rr)); loss = mean(-p**gamma * log p) with log p = "
    "F.logsigmoid(z) and p**gamma = exp(gamma * log p)."
)


def _loss_mistakes(pc, pr, rc, rr, beta: float, gamma: float) -> list[_Mistake]:
    h = (pc - rc) - (pr - rr)
    z = beta * h

    def focal(zz: torch.Tensor) -> torch.Tensor:
        return _focalpo_from_z(zz, torch.exp(gamma * F.logsigmoid(zz)))

    return [
        (-focal(z), "wrong sign: the loss -p**gamma * log p is >= 0."),
        (
            focal(beta * (pc - pr)),
            "the reference log-ratio is not subtracted: h = (pc - rc) - (pr - rr).",
        ),
        (focal(h), "beta is missing: z = beta * h."),
        (focal(-z), "chosen and rejected are swapped: z grows with the CHOSEN log-ratio."),
        (
            _focalpo_from_z(z, torch.exp(gamma * F.logsigmoid(-z))),
            "that is the focal-loss factor (1 - p)**gamma; FocalPO multiplies by p**gamma.",
        ),
        ((-F.logsigmoid(z)).mean(), "that is the DPO loss: multiply it by p**gamma."),
        (
            (-torch.exp(gamma * F.logsigmoid(z)) * F.logsigmoid(z)).sum(),
            "return the mean over the batch, not the sum.",
        ),
    ]


def _check_loss_gradient(name, case, fn, make, beta: float, gamma: float, detach: bool) -> None:
    """Compare d loss / d pc with the package's, in the mode asked for."""
    kwargs = {"beta": beta, "gamma": gamma}
    pc, pr, rc, rr = make()
    pc_ref = pc.clone().requires_grad_(True)
    expected = torch.autograd.grad(
        focalpo_loss(pc_ref, pr, rc, rr, **kwargs, detach_weight=detach), pc_ref
    )[0]
    other = pc.clone().requires_grad_(True)
    opposite = torch.autograd.grad(
        focalpo_loss(other, pr, rc, rr, **kwargs, detach_weight=not detach), other
    )[0]
    pc_reader = pc.clone().requires_grad_(True)
    loss = _call(name, case, fn, expected, pc_reader, pr, rc, rr, **kwargs, detach_weight=detach)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        failed(
            name,
            case + " (gradient w.r.t. pc)",
            _show(expected),
            "no gradient",
            "the loss must stay differentiable: no .item(), .detach() or torch.tensor(...) on it.",
        )
    got = torch.autograd.grad(loss, pc_reader, allow_unused=True)[0]
    got = torch.zeros_like(expected) if got is None else got.to(torch.float64)
    if _close(got, expected):
        return
    if not bool(torch.isfinite(got).all()):
        hint = (
            "the loss is right but its gradient is not finite: the derivative of "
            "sigmoid(z)**gamma is infinite where sigmoid(z) underflows to 0. Compute p**gamma as "
            "exp(gamma * F.logsigmoid(z))."
        )
    elif gamma > 0 and _close(got, opposite):
        hint = (
            "p**gamma is not detached: with detach_weight=True multiply by p**gamma.detach(), so "
            "the gradient is DPO's times p**gamma."
            if detach
            else "you detached p**gamma though detach_weight=False: leave it in the graph."
        )
    else:
        hint = "the values are right but the gradient is not: is part of the loss detached?"
    failed(name, case + " (gradient w.r.t. pc)", _show(expected), _show(got), hint)


def check_gradient_weight(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(z, *, gamma, detach_weight=False)``: w(z) in dL/dz = -w of FocalPO."""
    name = "gradient_weight"
    grid = _t(-8.0, -3.0, -1.0, -0.2, 0.0, 0.4, 1.5, 4.0)
    extreme = _t(-1e4, -60.0, 60.0, 1e4)
    cases = [(grid, 0.5, False), (grid, 2.0, True), (grid, 2.0, False), (grid, 0.0, False)]
    cases += [(extreme, 0.5, False), (extreme, 0.5, True)]
    for z, gamma, detach in cases:
        case = f"z={_show(z)}, gamma={gamma}, detach_weight={detach}"
        expected = gradient_weight(z, gamma=gamma, detach_weight=detach)
        raw = _call(name, case, fn, expected, z, gamma=gamma, detach_weight=detach)
        got, dtype = _as_tensor(name, case, raw, expected)
        mistakes = _weight_mistakes(z, gamma, detach)
        _diagnose(name, case, got, expected, mistakes, _WEIGHT_HINT, dtype)
    passed(name)


_WEIGHT_HINT = (
    "with p = sigmoid(z): in the graph w = p**g (1-p) (1 + g ln p); detached w = p**g (1-p). "
    "Compute p**g = exp(g * logsigmoid(z)), 1-p = exp(logsigmoid(-z)), ln p = logsigmoid(z)."
)


def _weight_mistakes(z: torch.Tensor, gamma: float, detach: bool) -> list[_Mistake]:
    p, log_p, one_minus_p = torch.sigmoid(z), F.logsigmoid(z), torch.sigmoid(-z)
    power = torch.exp(gamma * log_p)
    mistakes = [
        (
            -gradient_weight(z, gamma=gamma, detach_weight=detach),
            "wrong sign: return w, where dL/dz = -w (w > 0 means the loss pushes z up).",
        ),
        (
            (
                torch.exp(gamma * F.logsigmoid(-z))
                * one_minus_p
                * (1.0 if detach else 1 + gamma * log_p)
            ),
            "that is (1 - p)**gamma, focal loss's factor; FocalPO's is p**gamma.",
        ),
        (one_minus_p, "gamma is ignored: that is DPO's weight 1 - p."),
    ]
    if detach:
        mistakes.append(
            (
                gradient_weight(z, gamma=gamma),
                "with detach_weight=True p**gamma is a constant: no (1 + gamma ln p) factor.",
            )
        )
    else:
        mistakes += [
            (
                gradient_weight(z, gamma=gamma, detach_weight=True),
                "the (1 + gamma ln p) factor is missing: with p**gamma in the graph, the product "
                "rule also differentiates p**gamma.",
            ),
            (
                power * one_minus_p * (1 - gamma * log_p),
                "sign inside the product rule: -d(p**g log p)/dp = -p**(g-1) (1 + g ln p).",
            ),
            (
                power * (1 + gamma * log_p),
                "the (1 - p) factor is missing: chain rule, dp/dz = p (1 - p).",
            ),
            (
                power / p * (1 + gamma * log_p),
                "that is -dL/dp; multiply by dp/dz = p (1 - p) to get -dL/dz.",
            ),
        ]
    return mistakes
