"""Every exercise checker copes with the answers a reader gets wrong before the formula: a forgotten
``return``, the wrong type, an input changed in place, a bfloat16 computation, a tensor on another
device; and it accepts a numerical answer where one is a fair way to solve the exercise. Each hint
must name the problem. The right answers are written here independently of the checkers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from focalpo_mini import exercises
from focalpo_mini.exercises import blind_spot
from focalpo_mini.exercises.scratch import NUMERICAL_TOLERANCE
from focalpo_mini.losses import focal_loss, focalpo_loss


def _finite_difference(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Central differences of a scalar function of a float64 tensor, one entry at a time.

    Every loss below is a sum of per-example terms, so the gradient of the sum is each example's
    own derivative, which is what the checkers ask for.
    """
    step = 1e-5
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        up, down = x.clone(), x.clone()
        up.view(-1)[i] += step
        down.view(-1)[i] -= step
        grad.view(-1)[i] = (f(up) - f(down)) / (2 * step)
    return grad


# --- right answers, one per checker ---------------------------------------------------------------


def _balanced_ce(x, y, alpha):
    log_pt = torch.where(y.bool(), F.logsigmoid(x), F.logsigmoid(-x))
    return -torch.where(y.bool(), alpha, 1 - alpha) * log_pt


def _focal(x, y, gamma, alpha):
    return focal_loss(x, y, gamma=gamma, alpha=alpha, reduction="none")


def _focal_grad_numerical(x, y, gamma):
    return _finite_difference(
        lambda v: focal_loss(v, y, gamma=gamma, alpha=None, reduction="sum"), x
    )


def _autograd(loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    return torch.autograd.grad(loss(leaf), leaf)[0]


def _focal_grad(x, y, gamma):
    return _autograd(lambda v: focal_loss(v, y, gamma=gamma, alpha=None, reduction="sum"), x)


def _bt_nll(r, w, v):
    return -F.logsigmoid(r[w] - r[v]).mean()


def _bt_grad(r, w, v):
    return _autograd(lambda x: _bt_nll(x, w, v), r)


def _bt_grad_numerical(r, w, v):
    return _finite_difference(lambda x: _bt_nll(x, w, v), r)


def _dpo(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def _dpo_weight_numerical(z):
    return -_finite_difference(lambda v: -F.logsigmoid(v).sum(), z)


def _accuracies(pc, pr, rc, rr, beta):
    return (pc >= pr).double().mean().item(), (
        beta * (pc - rc) > beta * (pr - rr)
    ).double().mean().item()


def _threshold(rc, rr, beta):
    return -F.logsigmoid(beta * (rr - rc))


def _idealized(rc, rr, rho, beta):
    return rc - rr + (torch.log(rho) - torch.log1p(-rho)) / beta > 0


def _sign_flip_bisection(gamma):
    low, high = 1e-12, 1.0  # 1 + gamma ln p is negative at low, positive at high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if 1 + gamma * math.log(mid) < 0 else (low, mid)
    return (low + high) / 2


def _peak_grid(gamma, points=100_001):
    p = torch.linspace(0, 1, points, dtype=torch.float64)
    return p[(p**gamma * (1 - p)).argmax()].item()


def _focal_direction(z, *, gamma):
    q = torch.sigmoid(-z)
    return torch.exp(gamma * F.logsigmoid(-z)) * (q - gamma * torch.sigmoid(z) * F.logsigmoid(z))


def _focal_direction_numerical(z, *, gamma):
    return -_finite_difference(
        lambda v: -(torch.exp(gamma * F.logsigmoid(-v)) * F.logsigmoid(v)).sum(), z
    )


def _sequence_logps(logits, labels, mask):
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    return (token_logps * mask[:, 1:]).sum(-1)


def _gradient_weight(z, *, gamma, detach_weight=False):
    log_p = F.logsigmoid(z)
    weight = torch.exp(gamma * log_p + F.logsigmoid(-z))
    return weight if detach_weight else weight * (1 + gamma * log_p)


def _gradient_weight_numerical(z, *, gamma, detach_weight=False):
    held = torch.exp(gamma * F.logsigmoid(z))  # the detached factor: a constant at each z

    def loss(v):
        factor = held if detach_weight else torch.exp(gamma * F.logsigmoid(v))
        return -(factor * F.logsigmoid(v)).sum()

    return -_finite_difference(loss, z)


@dataclass(frozen=True)
class Exercise:
    """A checker, a right answer, and how to build the answers under test from it."""

    name: str
    checker: Callable[[Callable[..., Any]], None]
    right: Callable[..., Any]
    kind: str  # "tensor", "float", "pair" (two floats) or "bool"
    mutate: int | None = None  # the positional tensor argument to change in place (None: no tensor)
    numerical: Callable[..., Any] | None = None


EXERCISES = [
    Exercise(
        "balanced_cross_entropy", exercises.check_balanced_cross_entropy, _balanced_ce, "tensor", 0
    ),
    Exercise("focal_loss", exercises.check_focal_loss, _focal, "tensor", 0),
    Exercise(
        "focal_gradient",
        exercises.check_focal_gradient,
        _focal_grad,
        "tensor",
        0,
        _focal_grad_numerical,
    ),
    Exercise(
        "bt_probability",
        exercises.check_bt_probability,
        lambda a, b: torch.sigmoid(a - b),
        "tensor",
        0,
    ),
    Exercise("bt_nll", exercises.check_bt_nll, _bt_nll, "tensor", 0),
    Exercise(
        "bt_gradient",
        exercises.check_bt_gradient,
        _bt_grad,
        "tensor",
        0,
        _bt_grad_numerical,
    ),
    Exercise(
        "optimal_policy",
        exercises.check_optimal_policy,
        lambda p, r, b: torch.softmax(torch.log(p) + r / b, -1),
        "tensor",
        0,
    ),
    Exercise(
        "implicit_reward", exercises.check_implicit_reward, lambda a, b, c: c * (a - b), "tensor", 1
    ),
    Exercise("dpo_loss", exercises.check_dpo_loss, _dpo, "tensor", 2),
    Exercise(
        "dpo_weight",
        exercises.check_dpo_weight,
        lambda z: torch.sigmoid(-z),
        "tensor",
        0,
        _dpo_weight_numerical,
    ),
    Exercise("accuracies", blind_spot.check_accuracies, _accuracies, "pair", 0),
    Exercise("ranking_threshold", blind_spot.check_ranking_threshold, _threshold, "tensor", 0),
    Exercise("idealized_ranking", blind_spot.check_idealized_ranking, _idealized, "bool", 0),
    Exercise(
        "sign_flip_probability",
        exercises.check_sign_flip_probability,
        lambda g: math.exp(-1 / g),
        "float",
        None,
        _sign_flip_bisection,
    ),
    Exercise(
        "detached_weight_peak",
        exercises.check_detached_weight_peak,
        lambda g: g / (1 + g),
        "float",
        None,
        _peak_grid,
    ),
    Exercise(
        "focal_direction_weight",
        exercises.check_focal_direction_weight,
        _focal_direction,
        "tensor",
        0,
        _focal_direction_numerical,
    ),
    Exercise("sequence_logps", exercises.check_sequence_logps, _sequence_logps, "tensor", 0),
    Exercise("focalpo_loss", exercises.check_focalpo_loss, focalpo_loss, "tensor", 1),
    Exercise(
        "gradient_weight",
        exercises.check_gradient_weight,
        _gradient_weight,
        "tensor",
        0,
        _gradient_weight_numerical,
    ),
]
IDS = [e.name for e in EXERCISES]
NUMERICAL = [e for e in EXERCISES if e.numerical is not None]


def _hint(exercise: Exercise, answer: Callable[..., Any]) -> str:
    with pytest.raises(AssertionError) as info:
        exercise.checker(answer)
    message = str(info.value)
    assert message.startswith(f"✗ {exercise.name} failed on"), message
    assert "expected:" in message and "got:" in message
    return message.split("hint:")[1]


def _map_result(result: Any, convert: Callable[[torch.Tensor], Any]) -> Any:
    """``convert`` applied to the answer, or to each of its values when it is a pair."""
    if isinstance(result, tuple):
        return tuple(convert(torch.tensor(v, dtype=torch.float64)) for v in result)
    if isinstance(result, float):
        return convert(torch.tensor(result, dtype=torch.float64))
    return convert(result)


def test_every_exported_checker_is_covered():
    covered = {e.checker for e in EXERCISES}
    exported = {getattr(exercises, name) for name in exercises.__all__}
    chapter_4 = {getattr(blind_spot, name) for name in dir(blind_spot) if name.startswith("check_")}
    assert covered == exported | chapter_4


@pytest.mark.parametrize("exercise", EXERCISES, ids=IDS)
def test_right_answer_passes(exercise, capsys):
    exercise.checker(exercise.right)
    assert capsys.readouterr().out.strip() == f"✓ {exercise.name}: correct."


@pytest.mark.parametrize("exercise", EXERCISES, ids=IDS)
def test_none_names_the_missing_return(exercise):
    def forgot_return(*args, **kwargs):
        exercise.right(*args, **kwargs)

    hint = _hint(exercise, forgot_return)
    assert "returned None" in hint and "forget `return`" in hint


WRONG_TYPES = [
    (lambda *a, **k: "0.5", "returned a str"),
    (lambda *a, **k: {"loss": 0.5}, "returned a dict"),
    (lambda *a, **k: (v for v in range(3)), "returned a generator"),
    (lambda *a, **k: object(), "returned an object of type object"),
]


@pytest.mark.parametrize("exercise", EXERCISES, ids=IDS)
@pytest.mark.parametrize(
    ("answer", "named"), WRONG_TYPES, ids=["str", "dict", "generator", "object"]
)
def test_a_wrong_type_is_named(exercise, answer, named):
    hint = _hint(exercise, answer)
    assert named in hint
    wanted = {"tensor": "a tensor", "float": "a float", "pair": "a tuple", "bool": "a bool tensor"}
    assert wanted[exercise.kind] in hint


@pytest.mark.parametrize(
    "exercise", [e for e in EXERCISES if e.kind != "pair"], ids=lambda e: e.name
)
def test_a_tuple_is_named(exercise):
    """A (loss, metrics) tuple, as the rlhf-book losses return, where one value is asked for."""

    def with_metrics(*args, **kwargs):
        return exercise.right(*args, **kwargs), {"note": 1}

    assert "returned a tuple of 2 values" in _hint(exercise, with_metrics)


def test_a_pair_of_the_wrong_length_or_with_none_is_named():
    exercise = next(e for e in EXERCISES if e.kind == "pair")
    assert "yours has 3 values" in _hint(exercise, lambda *a: (*_accuracies(*a), 0.0))
    assert "second (reward accuracy) value is None" in _hint(
        exercise, lambda *a: (_accuracies(*a)[0], None)
    )
    assert "not a single float" in _hint(exercise, lambda *a: 0.5)


@pytest.mark.parametrize(
    "exercise", [e for e in EXERCISES if e.mutate is not None], ids=lambda e: e.name
)
def test_an_in_place_change_is_named_and_does_not_leak(exercise, capsys):
    def changes_input_first(*args, **kwargs):
        args[exercise.mutate].mul_(0.5)
        return exercise.right(*args, **kwargs)

    def changes_input_after(*args, **kwargs):
        result = exercise.right(*args, **kwargs)
        args[exercise.mutate].add_(1.0)
        return result

    for answer in (changes_input_first, changes_input_after):
        hint = _hint(exercise, answer)
        assert "changed its input tensor in place" in hint
    exercise.checker(exercise.right)  # the checker's own test tensors are as they were
    assert "✓" in capsys.readouterr().out


def test_a_clamp_in_place_does_not_change_the_extreme_case():
    """The issue's case: after x.clamp_(-50, 50) the extreme-logit case must still test +-200."""

    def clamps(x, y, alpha):
        x.clamp_(-50, 50)
        return _balanced_ce(x, y, alpha)

    with pytest.raises(AssertionError):
        exercises.check_balanced_cross_entropy(clamps)
    with pytest.raises(AssertionError, match=r"extreme logits=\[-200.0, 200.0"):
        exercises.check_balanced_cross_entropy(lambda x, y, a: _balanced_ce(x.clamp(-50, 50), y, a))


@pytest.mark.parametrize(
    "exercise", [e for e in EXERCISES if e.kind != "bool"], ids=lambda e: e.name
)
def test_a_bfloat16_answer_gets_a_precision_hint(exercise):
    def in_bf16(*args, **kwargs):
        return _map_result(exercise.right(*args, **kwargs), lambda t: t.to(torch.bfloat16))

    hint = _hint(exercise, in_bf16)
    assert "bfloat16" in hint and "float64" in hint


def test_a_low_precision_bool_answer_is_asked_for_a_bool_tensor():
    exercise = next(e for e in EXERCISES if e.kind == "bool")
    hint = _hint(exercise, lambda *a: exercise.right(*a).to(torch.bfloat16))
    assert "bool tensor" in hint and "bfloat16" in hint


def test_an_answer_computed_in_bfloat16_is_told_about_precision():
    def sequence_logps_bf16(logits, labels, mask):
        return _sequence_logps(logits.bfloat16(), labels, mask)

    assert "bfloat16" in _hint(EXERCISES[IDS.index("sequence_logps")], sequence_logps_bf16)


@pytest.mark.parametrize("exercise", EXERCISES, ids=IDS)
def test_a_tensor_without_values_on_another_device_is_explained(exercise):
    def on_meta(*args, **kwargs):
        return _map_result(exercise.right(*args, **kwargs), lambda t: t.to("meta"))

    hint = _hint(exercise, on_meta)
    assert "'meta' device" in hint and "CPU" in hint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("exercise", EXERCISES, ids=IDS)
def test_a_right_answer_on_the_gpu_is_accepted(exercise, capsys):
    def on_gpu(*args, **kwargs):
        return _map_result(exercise.right(*args, **kwargs), lambda t: t.cuda())

    exercise.checker(on_gpu)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("exercise", NUMERICAL, ids=lambda e: e.name)
def test_a_numerical_answer_is_accepted(exercise, capsys):
    exercise.checker(exercise.numerical)
    assert "✓" in capsys.readouterr().out


def test_a_coarse_grid_search_is_told_the_tolerance():
    exercise = EXERCISES[IDS.index("detached_weight_peak")]
    hint = _hint(exercise, lambda g: _peak_grid(g, points=51))  # a grid step of 0.02
    assert f"within {NUMERICAL_TOLERANCE:g}" in hint
    assert NUMERICAL_TOLERANCE == 1e-3
    exercise.checker(lambda g: g / (1 + g) + 0.9 * NUMERICAL_TOLERANCE)  # inside: accepted
    with pytest.raises(AssertionError):
        exercise.checker(lambda g: g / (1 + g) + 1.1 * NUMERICAL_TOLERANCE)
