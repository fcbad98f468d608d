"""Checkers for chapter 4, why DPO rarely fixes misranked pairs (Chen et al., 2024).

Each ``check_<name>(fn)`` calls the reader's ``fn`` on float64 log-probs built so that the common
wrong answers give different results, compares it with :mod:`focalpo_mini.ranking`, and on a
mismatch names the wrong answer the output matches; it never reads source code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from focalpo_mini.exercises._check import (
    LOW_PRECISION,
    call,
    describe,
    failed,
    fresh,
    passed,
    precision_hint,
    read_float,
    read_tensor,
    real_tensor,
    to_cpu,
    type_hint,
)
from focalpo_mini.ranking import idealized_ranked_correctly, ranking_threshold

_Mistake = tuple[Callable[..., Any], str]

_OVERFLOW_HINT = (
    "your output is not finite where the answer is: sigmoid underflowed to 0 before the log. "
    "Use F.logsigmoid(x) instead of torch.log(torch.sigmoid(x))."
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Pairs chosen so that every wrong answer below differs from the right one: the policy prefers
# y_l in pairs 1 and 3 although its implicit reward prefers y_w; pair 2 is a tie under the policy
# and pair 4 a tie of the rewards; the reference ranks only pair 0 correctly, so a ranking read
# from the reference's log-probs differs from the policy's.
_POLICY_CHOSEN = _t(-4.0, -9.0, -6.0, -3.0, -12.0, -5.0)
_POLICY_REJECTED = _t(-6.0, -7.0, -6.0, -2.0, -10.0, -8.0)
_REF_CHOSEN = _t(-5.0, -12.0, -7.0, -8.0, -12.0, -4.5)
_REF_REJECTED = _t(-5.0, -6.0, -4.0, -5.0, -10.0, -4.0)
_ACC_ARGS = (_POLICY_CHOSEN, _POLICY_REJECTED, _REF_CHOSEN, _REF_REJECTED, 0.1)
_ACC_LABEL = "six pairs with policy and reward ties"


def _show(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        values = x.flatten().tolist()
        return str([v if isinstance(v, bool) else round(v, 6) for v in values])
    if isinstance(x, tuple):
        return "(" + ", ".join(_show(v) for v in x) + ")"
    return f"{x:.6g}" if isinstance(x, float) else repr(x)


def _same(a: Any, b: Any, dtype: torch.dtype | None = None) -> bool:
    """Whether ``b`` equals ``a``; to ``dtype``'s precision if that is a low-precision dtype."""
    rtol, atol = (1e-6, 1e-9) if dtype not in LOW_PRECISION else (4 * torch.finfo(dtype).eps,) * 2
    if isinstance(a, tuple):
        return (
            isinstance(b, tuple)
            and len(a) == len(b)
            and all(_same(x, y, dtype) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol))
        )
    return abs(float(a) - float(b)) <= max(
        1e-6, atol
    )  # float32 means of a few pairs are that close


def _run(
    name: str,
    fn: Callable[..., Any],
    cases: Sequence[tuple[str, tuple[Any, ...]]],
    reference: Callable[..., Any],
    read: Callable[[str, str, str, Any], tuple[Any, torch.dtype | None]],
    mistakes: Sequence[_Mistake],
    generic_hint: str,
) -> None:
    """Compare ``fn`` with ``reference`` on every case; report the first failure with a hint.

    ``read(name, case, expected, raw)`` turns the reader's answer into the reference's form (or
    fails with a hint naming what came back) and says in which dtype it was computed. Every call
    gets fresh copies of the inputs.
    """
    for label, args in cases:
        expected = reference(*fresh(args))
        shown = _show(expected)
        got, dtype = read(name, label, shown, call(name, label, shown, fn, *args))
        if _same(expected, got):
            continue
        if dtype in LOW_PRECISION and _same(expected, got, dtype):
            failed(name, label, shown, f"{_show(got)} ({dtype})", precision_hint(dtype))
        hint = next((h for wrong, h in mistakes if _same(wrong(*fresh(args)), got, dtype)), None)
        if hint is None:
            overflow = isinstance(got, torch.Tensor) and not bool(torch.isfinite(got).all())
            hint = _OVERFLOW_HINT if overflow else generic_hint
        failed(name, label, shown, _show(got), hint)
    passed(name)


# --- Exercise 1: ranking accuracy against reward accuracy --------------------------------------


def _rate(mask: torch.Tensor) -> float:
    return int(mask.sum()) / mask.numel()


def _accuracies(pc, pr, rc, rr, beta) -> tuple[float, float]:
    rewards_w, rewards_l = beta * (pc - rc), beta * (pr - rr)
    return _rate(pc >= pr), _rate(rewards_w > rewards_l)


def _read_pair(name: str, case: str, expected: str, raw: Any) -> tuple[Any, torch.dtype | None]:
    """The reader's ``(ranking_accuracy, reward_accuracy)`` as two floats, and their dtype."""
    want = "a tuple (ranking_accuracy, reward_accuracy) of two floats"
    if not isinstance(raw, (tuple, list)):
        hint = type_hint(raw, want) or f"return {want}, not a single {type(raw).__name__}."
        failed(name, case, expected, describe(raw), hint)
    if len(raw) != 2:
        failed(name, case, expected, describe(raw), f"return {want}; yours has {len(raw)} values.")
    values, dtype = [], None
    for position, value in zip(
        ("first (ranking accuracy)", "second (reward accuracy)"), raw, strict=True
    ):
        if value is None:
            failed(name, case, expected, describe(raw), f"the {position} value is None.")
        if type_hint(value, "a float") is not None:
            hint = f"the {position} value is a {type(value).__name__}: return a float there."
            failed(name, case, expected, describe(raw), hint)
        number, value_dtype = read_float(name, case, expected, value)
        values.append(number.item())
        dtype = value_dtype if value_dtype in LOW_PRECISION else dtype
    return tuple(values), dtype


def check_accuracies(fn: Callable[..., tuple[float, float]]) -> None:
    """Check ``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)``.

    It must return ``(ranking_accuracy, reward_accuracy)``: the fraction of pairs with
    pi(y_w) >= pi(y_l) (ties count as correct, as in Chen et al.), and TRL's
    ``rewards/accuracies``, the fraction with beta log-ratio of y_w > that of y_l (ties wrong).
    """

    def strict_ranking(pc, pr, rc, rr, beta):
        return _rate(pc > pr), _accuracies(pc, pr, rc, rr, beta)[1]

    def lenient_reward(pc, pr, rc, rr, beta):
        return _rate(pc >= pr), _rate(beta * (pc - rc) >= beta * (pr - rr))

    mistakes = [
        (
            lambda *a: _accuracies(*a)[::-1],
            "the two numbers are swapped: return (ranking_accuracy, reward_accuracy).",
        ),
        (
            lambda *a: (_accuracies(*a)[1],) * 2,
            "your ranking accuracy compares the implicit rewards beta (log pi - log pi_ref); "
            "ranking accuracy compares the policy's own log-probs, log pi(y_w) >= log pi(y_l).",
        ),
        (
            lambda *a: (_accuracies(*a)[0],) * 2,
            "your reward accuracy compares the policy's log-probs; TRL's rewards/accuracies "
            "compares beta (log pi - log pi_ref) of y_w and y_l.",
        ),
        (
            lambda pc, pr, rc, rr, beta: (_rate(pc >= pr), _rate(pc > pr)),
            "your reward accuracy forgets the reference term: the implicit reward is "
            "beta (log pi(y|x) - log pi_ref(y|x)), not beta log pi(y|x).",
        ),
        (
            lambda pc, pr, rc, rr, beta: (_rate(rc >= rr), _accuracies(pc, pr, rc, rr, beta)[1]),
            "your ranking accuracy uses the reference's log-probs: that is the reference's "
            "ranking. Ranking accuracy is the policy's own, log pi(y_w) >= log pi(y_l) with the "
            "policy's log-probs (the first two arguments).",
        ),
        (
            strict_ranking,
            "ties: Chen et al. count pi(y_w) = pi(y_l) as ranked correctly; use >=, not >.",
        ),
        (
            lambda *a: (strict_ranking(*a)[0], lenient_reward(*a)[1]),
            "ties are the wrong way round in both: ranking uses >=, rewards/accuracies uses >.",
        ),
        (
            lenient_reward,
            "ties: TRL's rewards/accuracies counts equal rewards as wrong; use >, not >=.",
        ),
    ]
    cases = [
        (_ACC_LABEL + ", beta=0.1", _ACC_ARGS),
        (_ACC_LABEL + ", beta=3", (*_ACC_ARGS[:4], 3.0)),
    ]
    hint = "ranking: mean of logp_w >= logp_l; reward: mean of beta*(logp_w - ref_w) > beta*(...)."
    _run("accuracies", fn, cases, _accuracies, _read_pair, mistakes, hint)


# --- Exercise 2: the loss threshold of Chen et al.'s theorem -----------------------------------


def _threshold(rc, rr, beta) -> torch.Tensor:
    return ranking_threshold(rc, rr, beta=beta)


def check_ranking_threshold(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(ref_chosen_logps, ref_rejected_logps, beta)``: -log sigmoid(beta c) per pair,
    with c = log pi_ref(y_l) - log pi_ref(y_w), shape ``(B,)``."""
    mistakes = [
        (
            lambda rc, rr, beta: -F.logsigmoid(beta * (rc - rr)),
            "c has the wrong direction: c = log pi_ref(y_l) - log pi_ref(y_w), so pairs the "
            "reference misranks (c > 0) get a threshold below log 2.",
        ),
        (
            lambda rc, rr, beta: -F.logsigmoid(rr - rc),
            "beta is missing: the DPO loss is -log sigmoid(beta h), so the threshold is "
            "-log sigmoid(beta c).",
        ),
        (
            lambda rc, rr, beta: F.logsigmoid(beta * (rr - rc)),
            "wrong sign: a loss threshold is positive, -log sigmoid(beta c).",
        ),
        (
            lambda rc, rr, beta: torch.sigmoid(-beta * (rr - rc)),
            "that is sigmoid(-beta c), DPO's gradient weight, not the loss -log sigmoid(beta c).",
        ),
    ]
    cases = [
        (f"ref logps w={_show(_REF_CHOSEN)}, l={_show(_REF_REJECTED)}, beta=0.1", _ACC_ARGS[2:]),
        ("the same pairs, beta=1", (_REF_CHOSEN, _REF_REJECTED, 1.0)),
        ("far-apart pairs, beta=1", (_t(-10.0, -2000.0), _t(-2000.0, -10.0), 1.0)),
    ]
    hint = "threshold = -log sigmoid(beta * (ref_rejected - ref_chosen)); use F.logsigmoid."
    _run("ranking_threshold", fn, cases, _threshold, read_tensor, mistakes, hint)


# --- Exercise 3: the idealized ranking ----------------------------------------------------------


def _read_bool(name: str, case: str, expected: str, raw: Any) -> tuple[torch.Tensor, None]:
    """The reader's answer as a bool CPU tensor (its dtype needs no precision check)."""
    want = "a bool tensor (one entry per pair)"
    hint = type_hint(raw, want)
    if hint is not None:
        failed(name, case, expected, describe(raw), hint)
    got = to_cpu(name, case, expected, real_tensor(name, case, expected, raw, f"return {want}."))
    if got.dtype != torch.bool:
        hint = f"return {want}, got dtype {got.dtype}: end with a comparison such as `... > 0`."
        failed(name, case, expected, describe(got), hint)
    return got, None


def _idealized(rc, rr, rho, beta) -> torch.Tensor:
    return idealized_ranked_correctly(rc, rr, rho, beta=beta)


def check_idealized_ranking(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(ref_chosen_logps, ref_rejected_logps, rho, beta)``: per pair, whether the
    ideal policy ranks y_w first, pi_ref(y_w)/pi_ref(y_l) * (rho/(1-rho))**(1/beta) > 1.

    ``rho`` is the raters' probability that y_w is preferred (Chen et al. write alpha; the book
    keeps alpha for focal loss's class weight).
    """

    def log_odds(rho):
        return torch.log(rho) - torch.log1p(-rho)

    mistakes = [
        (
            lambda rc, rr, a, beta: log_odds(a) > 0,
            "the reference term is missing: the ideal policy is pi_ref times "
            "exp(r / beta), so pi_ref(y_w)/pi_ref(y_l) stays in the condition.",
        ),
        (
            lambda rc, rr, a, beta: rc - rr > 0,
            "rho is missing: that is the reference's own ranking, not the ideal policy's.",
        ),
        (
            lambda rc, rr, a, beta: rc - rr + log_odds(a) > 0,
            "the exponent 1/beta is missing: the reward gap log(rho/(1-rho)) is divided by "
            "beta in the ideal policy pi_ref exp(r / beta).",
        ),
        (
            lambda rc, rr, a, beta: rc - rr + beta * log_odds(a) > 0,
            "the reward gap is divided by beta, not multiplied: pi* = pi_ref exp(r / beta).",
        ),
        (
            lambda rc, rr, a, beta: rr - rc + log_odds(a) / beta > 0,
            "the reference ratio is upside down: it is pi_ref(y_w) / pi_ref(y_l).",
        ),
        (
            lambda rc, rr, a, beta: rc - rr - log_odds(a) / beta > 0,
            "rho/(1-rho) is upside down: rho is the raters' probability that y_w is preferred.",
        ),
    ]
    # log pi_ref(y_w) - log pi_ref(y_l) = [0, -6, -2, -1, -2, 0.5, 4]: each wrong answer below
    # gets at least one of these seven pairs wrong, and no two wrong answers agree on all.
    ref_chosen = _t(-5.0, -12.0, -6.0, -6.0, -7.0, -4.5, -2.0)
    ref_rejected = _t(-5.0, -6.0, -4.0, -5.0, -5.0, -5.0, -6.0)
    rho = _t(0.8, 0.8, 0.2, 0.8, 0.8, 0.3, 0.8)
    label = f"ref logps w={_show(ref_chosen)}, l={_show(ref_rejected)}, rho={_show(rho)}, beta=0.5"
    cases = [
        (label, (ref_chosen, ref_rejected, rho, 0.5)),
        ("the same pairs, beta=2", (ref_chosen, ref_rejected, rho, 2.0)),
    ]
    hint = "correct iff log pi_ref(y_w) - log pi_ref(y_l) + log(rho / (1 - rho)) / beta > 0."
    _run("idealized_ranking", fn, cases, _idealized, _read_bool, mistakes, hint)
