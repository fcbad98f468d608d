"""Chapter 4's checkers accept right answers and reject the usual wrong ones with the right hint."""

import pytest
import torch
import torch.nn.functional as F

from focalpo_mini.exercises.blind_spot import (
    check_accuracies,
    check_idealized_ranking,
    check_ranking_threshold,
)

# --- ranking accuracy against reward accuracy ---------------------------------------------------


def _rate(mask):
    return mask.float().mean().item()


def accuracies_right(pc, pr, rc, rr, beta):
    return _rate(pc >= pr), _rate(beta * (pc - rc) > beta * (pr - rr))


def test_check_accuracies_accepts_a_right_answer(capsys):
    check_accuracies(accuracies_right)
    assert "✓ accuracies" in capsys.readouterr().out


def test_check_accuracies_accepts_tensors_and_lists():
    check_accuracies(lambda *a: [torch.tensor(v) for v in accuracies_right(*a)])


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda *a: accuracies_right(*a)[::-1], "swapped"),
        (
            lambda pc, pr, rc, rr, b: (accuracies_right(pc, pr, rc, rr, b)[1],) * 2,
            "compares the policy's own log-probs",
        ),
        (lambda pc, pr, rc, rr, b: (_rate(pc >= pr), _rate(b * pc > b * pr)), "reference term"),
        (
            lambda pc, pr, rc, rr, b: (_rate(rc >= rr), _rate(b * (pc - rc) > b * (pr - rr))),
            "uses the reference's log-probs",
        ),
        (lambda pc, pr, rc, rr, b: (_rate(pc > pr), _rate(b * (pc - rc) > b * (pr - rr))), ">="),
        (
            lambda pc, pr, rc, rr, b: (_rate(pc >= pr), _rate(b * (pc - rc) >= b * (pr - rr))),
            "use >,",
        ),
        (lambda *a: 0.5, "return a tuple"),
    ],
)
def test_check_accuracies_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match="✗ accuracies") as info:
        check_accuracies(wrong)
    assert hint in str(info.value)


# --- the theorem's threshold ----------------------------------------------------------------------


def threshold_right(rc, rr, beta):
    return -F.logsigmoid(beta * (rr - rc))


def test_check_ranking_threshold_accepts_a_right_answer(capsys):
    check_ranking_threshold(threshold_right)
    assert "✓ ranking_threshold" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda rc, rr, b: -F.logsigmoid(b * (rc - rr)), "wrong direction"),
        (lambda rc, rr, b: -F.logsigmoid(rr - rc), "beta is missing"),
        (lambda rc, rr, b: F.logsigmoid(b * (rr - rc)), "wrong sign"),
        (lambda rc, rr, b: torch.sigmoid(-b * (rr - rc)), "gradient weight"),
        (lambda rc, rr, b: -torch.log(torch.sigmoid(b * (rr - rc))), "F.logsigmoid"),
    ],
)
def test_check_ranking_threshold_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match="✗ ranking_threshold") as info:
        check_ranking_threshold(wrong)
    assert hint in str(info.value)


# --- the idealized ranking ------------------------------------------------------------------------


def _log_odds(a):
    return torch.log(a / (1 - a))


def idealized_right(rc, rr, alpha, beta):
    return torch.exp(rc - rr) * (alpha / (1 - alpha)) ** (1 / beta) > 1


def test_check_idealized_ranking_accepts_a_right_answer(capsys):
    check_idealized_ranking(idealized_right)
    assert "✓ idealized_ranking" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda rc, rr, a, b: _log_odds(a) > 0, "reference term is missing"),
        (lambda rc, rr, a, b: rc - rr > 0, "rho is missing"),
        (lambda rc, rr, a, b: rc - rr + _log_odds(a) > 0, "exponent 1/beta is missing"),
        (lambda rc, rr, a, b: rc - rr + b * _log_odds(a) > 0, "not multiplied"),
        (lambda rc, rr, a, b: rr - rc + _log_odds(a) / b > 0, "reference ratio is upside down"),
        (lambda rc, rr, a, b: rc - rr - _log_odds(a) / b > 0, "rho/(1-rho) is upside down"),
        (lambda rc, rr, a, b: (rc - rr + _log_odds(a) / b).float(), "bool tensor"),
    ],
)
def test_check_idealized_ranking_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match="✗ idealized_ranking") as info:
        check_idealized_ranking(wrong)
    assert hint in str(info.value)
