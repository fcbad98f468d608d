"""Checkers for Part I: focal loss, Bradley-Terry reward models, and from RLHF to DPO.

Each ``check_<name>(fn)`` calls the reader's ``fn`` on fresh copies of a few float64 inputs,
extremes included, and compares it with a reference. When an answer is wrong, the checker evaluates
the common wrong answers on the same input and names the one the reader's output matches; it never
reads source code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from focalpo_mini.exercises._check import (
    LOW_PRECISION,
    call,
    failed,
    fresh,
    low_precision_close,
    passed,
    precision_hint,
    read_tensor,
)

_Case = tuple[str, tuple[Any, ...]]
_Mistake = tuple[Callable[..., torch.Tensor], str]

_OVERFLOW_HINT = (
    "your output is not finite where the answer is: something overflowed. Work in log space "
    "(F.logsigmoid, torch.logsumexp, torch.log_softmax) instead of exp, then log."
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True))


def _matches(got: torch.Tensor, wrong: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``got`` equals ``wrong``, to the precision of the dtype it was computed in."""
    return low_precision_close(got, wrong, dtype) if dtype in LOW_PRECISION else _close(got, wrong)


def _show(x: torch.Tensor) -> str:
    return str([round(v, 6) for v in x.flatten().tolist()]) if x.dim() else f"{x.item():.6g}"


def _run(
    name: str,
    fn: Callable[..., Any],
    cases: Sequence[_Case],
    reference: Callable[..., torch.Tensor],
    mistakes: Sequence[_Mistake],
    generic_hint: str,
) -> None:
    """Compare ``fn`` with ``reference`` on every case; report the first failure with a hint.

    Every call (the reader's, the reference's, each mistake's) gets fresh copies of the inputs.
    """
    for label, args in cases:
        expected = reference(*fresh(args))
        shown = _show(expected)
        got, dtype = read_tensor(name, label, shown, call(name, label, shown, fn, *args))
        if got.shape != expected.shape:
            hint = f"return a tensor of shape {tuple(expected.shape)}, not {tuple(got.shape)}."
            failed(name, label, shown, _show(got), hint)
        if _close(got, expected):
            continue
        low = dtype in LOW_PRECISION
        if low and low_precision_close(got, expected, dtype):
            failed(name, label, shown, f"{_show(got)} ({dtype})", precision_hint(dtype))
        hint = next((h for wrong, h in mistakes if _matches(got, wrong(*fresh(args)), dtype)), None)
        if hint is None:
            finite_expected = bool(torch.isfinite(expected).all())
            overflow = finite_expected and not bool(torch.isfinite(got).all())
            hint = _OVERFLOW_HINT if overflow else generic_hint
        if low:
            hint += f" (Your answer is also in {dtype}: compute in float64.)"
        failed(name, label, shown, _show(got), hint)
    passed(name)


# --- Chapter 1: focal loss -------------------------------------------------------------------

_FL_LOGITS = _t(-3.0, -0.5, 0.0, 0.7, 2.0, 4.0)
_FL_TARGETS = _t(1.0, 0.0, 1.0, 1.0, 0.0, 1.0)
_FL_EXTREME_LOGITS = _t(-200.0, 200.0, 200.0, -200.0)
_FL_EXTREME_TARGETS = _t(1.0, 0.0, 1.0, 0.0)
_FL_LABEL = f"logits={_show(_FL_LOGITS)}, targets={_show(_FL_TARGETS)}"
_FL_EXTREME_LABEL = (
    f"extreme logits={_show(_FL_EXTREME_LOGITS)}, targets={_show(_FL_EXTREME_TARGETS)}"
)


def _signed(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """s with p_t = sigmoid(s): the logit for positives, minus the logit for negatives."""
    return torch.where(targets.bool(), logits, -logits)


def _alpha_t(targets: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * targets + (1.0 - alpha) * (1.0 - targets)


def _balanced_ce(logits: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    return -_alpha_t(targets, alpha) * F.logsigmoid(_signed(logits, targets))


def check_balanced_cross_entropy(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(logits, targets, alpha)``: per-example loss -alpha_t log p_t, shape ``(N,)``."""
    cases = [
        (_FL_LABEL + ", alpha=0.25", (_FL_LOGITS, _FL_TARGETS, 0.25)),
        ("same logits, alpha=0.7", (_FL_LOGITS, _FL_TARGETS, 0.7)),
        (
            _FL_EXTREME_LABEL + ", alpha=0.25",
            (_FL_EXTREME_LOGITS, _FL_EXTREME_TARGETS, 0.25),
        ),
    ]
    mistakes = [
        (
            lambda x, y, a: -_balanced_ce(x, y, a),
            "wrong sign: the loss is -log p_t, never negative.",
        ),
        (lambda x, y, a: _balanced_ce(x, y, 0.5) * 2, "alpha_t is missing: multiply by alpha_t."),
        (
            lambda x, y, a: _balanced_ce(x, y, 0.5) * 2 * a,
            "you multiplied every example by alpha; alpha_t is alpha for positives (target 1) "
            "and 1 - alpha for negatives (target 0).",
        ),
        (
            lambda x, y, a: _balanced_ce(x, y, 0.5) * 2 * (1.0 - a),
            "you multiplied every example by 1 - alpha; alpha_t is alpha for positives "
            "(target 1) and 1 - alpha for negatives (target 0).",
        ),
        (
            lambda x, y, a: _balanced_ce(x, y, 1.0 - a),
            "alpha and 1 - alpha are swapped: alpha weights the positives (target 1).",
        ),
    ]
    hint = "compute p_t = sigmoid(logit) for target 1 and 1 - sigmoid(logit) for target 0."
    _run("balanced_cross_entropy", fn, cases, _balanced_ce, mistakes, hint)


def _focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    s = _signed(logits, targets)
    return -_alpha_t(targets, alpha) * torch.exp(gamma * F.logsigmoid(-s)) * F.logsigmoid(s)


def check_focal_loss(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(logits, targets, gamma, alpha)``: -alpha_t (1 - p_t)**gamma log p_t, ``(N,)``."""
    cases = [
        (_FL_LABEL + ", gamma=2, alpha=0.25", (_FL_LOGITS, _FL_TARGETS, 2.0, 0.25)),
        ("same logits, gamma=0.5, alpha=0.75", (_FL_LOGITS, _FL_TARGETS, 0.5, 0.75)),
        (
            _FL_EXTREME_LABEL + ", gamma=2, alpha=0.25",
            (_FL_EXTREME_LOGITS, _FL_EXTREME_TARGETS, 2.0, 0.25),
        ),
    ]
    mistakes = [
        (lambda x, y, g, a: -_focal(x, y, g, a), "wrong sign: the loss is never negative."),
        (
            lambda x, y, g, a: (
                -_alpha_t(y, a)
                * torch.exp(g * F.logsigmoid(_signed(x, y)))
                * F.logsigmoid(_signed(x, y))
            ),
            "the factor is (1 - p_t)**gamma, not p_t**gamma: you used p_t where 1 - p_t belongs.",
        ),
        (
            lambda x, y, g, a: _focal(x, y, g, 0.5) * 2,
            "alpha_t is missing: multiply by alpha_t as well.",
        ),
        (
            lambda x, y, g, a: _focal(x, y, g, 1.0 - a),
            "alpha and 1 - alpha are swapped: alpha weights the positives (target 1).",
        ),
        (
            lambda x, y, g, a: _focal(x, y, g, 0.5) * 2 * a,
            "you multiplied every example by alpha; alpha_t is alpha for positives (target 1) "
            "and 1 - alpha for negatives (target 0).",
        ),
        (
            lambda x, y, g, a: (
                -_alpha_t(y, a) * torch.exp(g * F.logsigmoid(-x)) * F.logsigmoid(_signed(x, y))
            ),
            "the factor uses 1 - p with p = sigmoid(logit) for every example; for target 0 it "
            "must be 1 - p_t = p.",
        ),
    ]
    hint = "FL = -alpha_t (1 - p_t)**gamma log p_t, with p_t the probability of the true class."
    _run("focal_loss", fn, cases, _focal, mistakes, hint)


def _focal_grad(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    s = _signed(logits, targets)
    log_pt, log_1m = F.logsigmoid(s), F.logsigmoid(-s)
    d_ds = torch.exp(gamma * log_1m) * (gamma * torch.exp(log_pt) * log_pt - torch.exp(log_1m))
    return torch.where(targets.bool(), d_ds, -d_ds)


def check_focal_gradient(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(logits, targets, gamma)``: dFL/dlogit per example (alpha off), shape ``(N,)``."""
    cases = [
        (_FL_LABEL + ", gamma=2", (_FL_LOGITS, _FL_TARGETS, 2.0)),
        ("same logits, gamma=1", (_FL_LOGITS, _FL_TARGETS, 1.0)),
        (
            _FL_EXTREME_LABEL + ", gamma=2",
            (_FL_EXTREME_LOGITS, _FL_EXTREME_TARGETS, 2.0),
        ),
    ]
    mistakes = [
        (lambda x, y, g: -_focal_grad(x, y, g), "wrong sign: gradient descent must raise p_t."),
        (
            lambda x, y, g: (
                torch.where(y.bool(), 1.0, -1.0)
                * -torch.exp((g + 1) * F.logsigmoid(-_signed(x, y)))
            ),
            "you treated (1 - p_t)**gamma as a constant: differentiate it too (product rule); "
            "it adds gamma p_t (1 - p_t)**gamma log p_t.",
        ),
        (
            lambda x, y, g: torch.where(y.bool(), _focal_grad(x, y, g), -_focal_grad(x, y, g)),
            "for target 0, p_t = 1 - sigmoid(logit), so dp_t/dlogit = -p_t (1 - p_t): the "
            "chain rule flips the sign for negatives.",
        ),
    ]
    hint = (
        "dFL/ds = (1 - p_t)**gamma (gamma p_t log p_t - (1 - p_t)), s = +-logit; then chain rule."
    )
    _run("focal_gradient", fn, cases, _focal_grad, mistakes, hint)


# --- Chapter 2: Bradley-Terry ----------------------------------------------------------------


def _bt_prob(r_i: torch.Tensor, r_j: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(r_i - r_j)


def check_bt_probability(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(r_i, r_j)``: P(i beats j) under Bradley-Terry with rewards r, shape ``(N,)``."""
    r_i, r_j = _t(0.0, 1.0, 2.0, -1.5, 0.3), _t(0.0, 0.0, 3.0, 0.5, 0.3)
    big_i, big_j = _t(1000.0, -1000.0, 800.0), _t(999.0, -998.0, -800.0)
    cases = [
        (f"r_i={_show(r_i)}, r_j={_show(r_j)}", (r_i, r_j)),
        (f"large rewards r_i={_show(big_i)}, r_j={_show(big_j)}", (big_i, big_j)),
    ]
    mistakes = [
        (lambda a, b: _bt_prob(b, a), "wrong sign: i is more likely to win when r_i > r_j."),
        (
            lambda a, b: a / (a + b),
            "r_i / (r_i + r_j) treats rewards as strengths; rewards are log-strengths: use "
            "sigmoid(r_i - r_j).",
        ),
    ]
    hint = "P(i beats j) = exp(r_i) / (exp(r_i) + exp(r_j)) = sigmoid(r_i - r_j)."
    _run("bt_probability", fn, cases, _bt_prob, mistakes, hint)


def _bt_nll(rewards: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(rewards[winners] - rewards[losers]).mean()


_BT_REWARDS = _t(0.5, -1.0, 2.0, 0.0)
_BT_WINNERS = torch.tensor([0, 2, 2, 1, 3, 0])
_BT_LOSERS = torch.tensor([1, 0, 3, 3, 1, 2])
_BT_BIG = _t(1000.0, -1000.0, 0.0, 10.0)
_BT_OTHER_WINNERS = torch.tensor([3, 1, 1, 0])
_BT_OTHER_LOSERS = torch.tensor([2, 3, 0, 1])


def _bt_cases() -> list[_Case]:
    def games(winners: torch.Tensor, losers: torch.Tensor) -> str:
        return f"winners={winners.tolist()}, losers={losers.tolist()}"

    first = games(_BT_WINNERS, _BT_LOSERS)
    other = games(_BT_OTHER_WINNERS, _BT_OTHER_LOSERS)
    return [
        (f"rewards={_show(_BT_REWARDS)}, {first}", (_BT_REWARDS, _BT_WINNERS, _BT_LOSERS)),
        (f"rewards={_show(_BT_BIG)}, {first}", (_BT_BIG, _BT_WINNERS, _BT_LOSERS)),
        (
            f"rewards={_show(_BT_REWARDS)}, {other}",
            (_BT_REWARDS, _BT_OTHER_WINNERS, _BT_OTHER_LOSERS),
        ),
    ]


def check_bt_nll(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(rewards, winners, losers)``: the mean negative log-likelihood, a scalar.

    ``rewards`` has shape ``(n_items,)``; ``winners`` and ``losers`` hold item indices, ``(M,)``.
    """
    mistakes = [
        (lambda r, w, v: -_bt_nll(r, w, v), "wrong sign: return the NEGATIVE log-likelihood."),
        (lambda r, w, v: _bt_nll(r, v, w), "winners and losers are swapped: use r_w - r_l."),
        (
            lambda r, w, v: _bt_nll(r, w, v) * len(w),
            "you summed over comparisons: take the mean.",
        ),
    ]
    hint = "NLL = -mean_k log sigmoid(r[winners[k]] - r[losers[k]])."
    _run("bt_nll", fn, _bt_cases(), _bt_nll, mistakes, hint)


def _bt_grad(
    rewards: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, *, weight_of_p: bool = False
) -> torch.Tensor:
    p = torch.sigmoid(rewards[winners] - rewards[losers])
    w = (p if weight_of_p else 1.0 - p) / len(winners)
    grad = torch.zeros_like(rewards)
    grad.index_add_(0, winners, -w)
    grad.index_add_(0, losers, w)
    return grad


def check_bt_gradient(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(rewards, winners, losers)``: gradient of the mean NLL, shape ``(n_items,)``."""

    def winners_only(r: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(r[w] - r[v])
        return torch.zeros_like(r).index_add_(0, w, -(1.0 - p) / len(w))

    def indexed_update(r: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        weight = (1.0 - torch.sigmoid(r[w] - r[v])) / len(w)
        grad = torch.zeros_like(r)
        grad[w] -= weight  # keeps one update per repeated index, not their sum
        grad[v] += weight
        return grad

    mistakes = [
        (lambda r, w, v: -_bt_grad(r, w, v), "wrong sign: the winner's gradient is negative."),
        (
            lambda r, w, v: _bt_grad(r, w, v, weight_of_p=True),
            "you used p where 1 - p belongs: each comparison contributes sigmoid(r_l - r_w).",
        ),
        (winners_only, "the loser's term is missing: r_l gets +(1 - p_k)/M from comparison k."),
        (
            indexed_update,
            "the duplicate-index bug: an item wins (or loses) several comparisons, and "
            "`g[w] -= wt` writes each repeated index once, so all but one of its terms are lost "
            "(indexed assignment does not accumulate). Accumulate with "
            "g.index_add_(0, w, -wt) and g.index_add_(0, l, wt).",
        ),
        (
            lambda r, w, v: _bt_grad(r, w, v) * len(w),
            "you differentiated the sum, not the mean: divide by the number of comparisons.",
        ),
    ]
    hint = "d/dr_i = (1/M) sum_k (1 - p_k) ([i is loser k] - [i is winner k])."
    _run("bt_gradient", fn, _bt_cases(), _bt_grad, mistakes, hint)


# --- Chapter 3: from RLHF to DPO -------------------------------------------------------------


def _optimal(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.softmax(torch.log(ref_probs) + rewards / beta, dim=-1)


def check_optimal_policy(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(ref_probs, rewards, beta)``: pi* = pi_ref exp(r / beta) / Z, ``(K,)``."""
    ref, r = _t(0.5, 0.3, 0.15, 0.05), _t(0.0, 1.0, -0.5, 2.0)
    cases = [
        (f"ref_probs={_show(ref)}, rewards={_show(r)}, beta=0.5", (ref, r, 0.5)),
        ("same, beta=2.0", (ref, r, 2.0)),
        (f"ref_probs={_show(ref)}, rewards={_show(r * 10)}, beta=0.01", (ref, r * 10, 0.01)),
    ]
    mistakes = [
        (
            lambda p, q, b: torch.softmax(torch.log(p) + q * b, -1),
            "beta divides the reward: exp(r / beta), not exp(beta r).",
        ),
        (
            lambda p, q, b: torch.softmax(q / b, -1),
            "pi_ref is missing: pi* is proportional to pi_ref * exp(r / beta).",
        ),
        (
            lambda p, q, b: p * torch.exp(q / b),
            "not normalised: divide by Z = sum_y pi_ref(y) exp(r(y) / beta).",
        ),
        (
            lambda p, q, b: torch.softmax(torch.log(p) - q / b, -1),
            "wrong sign: higher reward must get more probability.",
        ),
    ]
    hint = "pi*(y) = pi_ref(y) exp(r(y)/beta) / Z; compute it as softmax(log pi_ref + r/beta)."
    _run("optimal_policy", fn, cases, _optimal, mistakes, hint)


def _implicit(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * (policy_logps - ref_logps)


def check_implicit_reward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(policy_logps, ref_logps, beta)``: beta (log pi - log pi_ref), shape ``(N,)``."""
    pol, ref = _t(-1.0, -5.0, -20.0, -0.1), _t(-2.0, -4.0, -20.0, -3.0)
    cases = [
        (f"policy_logps={_show(pol)}, ref_logps={_show(ref)}, beta=0.1", (pol, ref, 0.1)),
        ("same log-probs, beta=2.5", (pol, ref, 2.5)),
    ]
    mistakes = [
        (
            lambda a, b, c: c * a,
            "the reference log-prob is not subtracted: beta (log pi - log pi_ref).",
        ),
        (lambda a, b, c: a - b, "beta is missing: multiply the log-ratio by beta."),
        (lambda a, b, c: c * (b - a), "wrong sign: the reward is log pi minus log pi_ref."),
        (lambda a, b, c: (a - b) / c, "multiply by beta, do not divide."),
    ]
    hint = "r_hat(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))."
    _run("implicit_reward", fn, cases, _implicit, mistakes, hint)


def _dpo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def check_dpo_loss(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(pc, pr, rc, rr, beta)``: the per-pair DPO loss, shape ``(B,)``.

    ``pc, pr`` are the policy's chosen and rejected log-probs, ``rc, rr`` the reference's.
    """
    pc, pr = _t(-10.0, -12.0, -8.0, -30.0), _t(-11.0, -9.0, -8.0, -25.0)
    rc, rr = _t(-10.5, -10.0, -9.0, -20.0), _t(-10.0, -10.0, -7.0, -26.0)
    big_pc, big_pr, zero = _t(-1.0, -3000.0), _t(-3000.0, -1.0), _t(0.0, 0.0)
    cases = [
        (
            f"pc={_show(pc)}, pr={_show(pr)}, rc={_show(rc)}, rr={_show(rr)}, beta=0.5",
            (pc, pr, rc, rr, 0.5),
        ),
        (
            f"extreme margins pc={_show(big_pc)}, pr={_show(big_pr)}, rc=rr=0, beta=1",
            (big_pc, big_pr, zero, zero, 1.0),
        ),
    ]
    mistakes = [
        (lambda a, b, c, d, e: -_dpo(a, b, c, d, e), "wrong sign: the loss is -log sigmoid(z)."),
        (
            lambda a, b, c, d, e: _dpo(b, a, d, c, e),
            "chosen and rejected are swapped: z = beta [(pc - rc) - (pr - rr)].",
        ),
        (
            lambda a, b, c, d, e: -F.logsigmoid(e * (a - b)),
            "the reference log-ratio is not subtracted: use (pc - rc) - (pr - rr).",
        ),
        (lambda a, b, c, d, e: _dpo(a, b, c, d, 1.0), "beta is missing: z = beta * h."),
    ]
    hint = "loss = -logsigmoid(beta * ((pc - rc) - (pr - rr)))."
    _run("dpo_loss", fn, cases, _dpo, mistakes, hint)


def _dpo_weight(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(-z)


def check_dpo_weight(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(z)``: the weight w(z) in dL_DPO/dz = -w(z), shape ``(N,)``."""
    z = _t(-30.0, -2.0, -0.5, 0.0, 0.5, 2.0, 30.0)
    other = _t(-7.0, 1.0, 3.0)
    cases = [(f"z={_show(z)}", (z,)), (f"z={_show(other)}", (other,))]
    mistakes = [
        (torch.sigmoid, "you used p where 1 - p belongs: DPO's weight is 1 - p = sigmoid(-z)."),
        (
            lambda x: torch.sigmoid(x) * torch.sigmoid(-x),
            "p (1 - p) is dp/dz; the loss is -log p, and d(-log p)/dz = -(1 - p).",
        ),
        (lambda x: -torch.sigmoid(-x), "that is dL/dz itself; the weight is its negative, 1 - p."),
    ]
    hint = "dL/dz = -(1 - p) with p = sigmoid(z), so w(z) = 1 - p = sigmoid(-z)."
    _run("dpo_weight", fn, cases, _dpo_weight, mistakes, hint)
