"""Ranking accuracy and Chen et al.'s (2024) group analysis, from per-pair log-probs.

*Ranking accuracy* asks whether the policy itself prefers the chosen completion,
pi(y_w|x) >= pi(y_l|x). TRL's ``rewards/accuracies`` asks a different question, whether the
implicit reward beta * log(pi/pi_ref) of y_w beats that of y_l (see
:func:`focalpo_mini.metrics.preference_metrics`). Every function here takes summed completion
log-probs of shape ``(B,)`` and works in their dtype (float32 for half-precision inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from focalpo_mini._checks import (
    check_finite,
    check_flag,
    check_number,
    check_pair_logps,
    check_same_device,
    compute_dtype,
)
from focalpo_mini.losses import gradient_weight

GROUPS = (
    "ref_correct/now_correct",
    "ref_correct/now_incorrect",
    "ref_incorrect/now_correct",
    "ref_incorrect/now_incorrect",
)


def ranked_correctly(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """Per pair, whether a model ranks the chosen completion first: log pi(y_w|x) >= log pi(y_l|x).

    Ties count as correct, as in Chen et al. (2024). Apply it to the policy's log-probs for the
    policy's ranking, or to the reference's for the reference's.

    Args:
        chosen_logps, rejected_logps: shape ``(B,)``, summed completion log-probs of one model.

    Returns:
        Bool tensor, shape ``(B,)``.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    check_pair_logps(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    return chosen_logps >= rejected_logps


def ranking_accuracy(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> float:
    """Fraction of pairs a model ranks correctly, pi(y_w|x) >= pi(y_l|x) (Chen et al., 2024).

    Not TRL's ``rewards/accuracies``, which compares beta-scaled log-ratios to the reference.

    Args:
        chosen_logps, rejected_logps: shape ``(B,)``, summed completion log-probs of one model.

    Returns:
        A float in [0, 1].

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    correct = ranked_correctly(chosen_logps, rejected_logps)
    return int(correct.sum()) / correct.numel()


def ranking_threshold(
    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """The DPO loss a pair must reach to be ranked correctly: -log sigmoid(beta * c).

    With c = log pi_ref(y_l|x) - log pi_ref(y_w|x), Chen et al.'s (2024) theorem says the policy
    ranks a pair correctly iff its DPO loss is at most this threshold. Pairs the reference already
    ranks correctly (c <= 0) have a threshold of at least log 2, which they meet at the start of
    training; pairs it misranks by a wide margin need a loss close to 0.

    Args:
        ref_chosen_logps, ref_rejected_logps: shape ``(B,)``, the reference's summed log-probs.
        beta: strength of the KL constraint, ``> 0``.

    Returns:
        Shape ``(B,)``, in nats.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    beta = check_number("beta", beta, minimum=0.0, inclusive=False)
    dtype = compute_dtype(
        check_pair_logps(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    )
    c = ref_rejected_logps.to(dtype) - ref_chosen_logps.to(dtype)
    return -F.logsigmoid(beta * c)


def idealized_ranked_correctly(
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    alpha: torch.Tensor | float,
    *,
    beta: float,
) -> torch.Tensor:
    """Per pair, whether the ideal DPO/RLHF policy ranks it correctly (Chen et al., 2024).

    The optimum of the KL-constrained objective is pi*(y|x) proportional to
    pi_ref(y|x) exp(r(x, y) / beta); with a Bradley-Terry reward,
    r_w - r_l = log(alpha / (1 - alpha)), where alpha is the probability that raters prefer
    y_w. So pi* ranks the pair correctly iff
    log pi_ref(y_w|x) - log pi_ref(y_l|x) + log(alpha / (1 - alpha)) / beta > 0.

    Args:
        ref_chosen_logps, ref_rejected_logps: shape ``(B,)``, the reference's summed log-probs.
        alpha: the preference probability of y_w over y_l, in (0, 1): a float, or shape ``(B,)``.
        beta: strength of the KL constraint, ``> 0``.

    Returns:
        Bool tensor, shape ``(B,)``.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    beta = check_number("beta", beta, minimum=0.0, inclusive=False)
    dtype = compute_dtype(
        check_pair_logps(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    )
    if isinstance(alpha, torch.Tensor):
        if alpha.shape != ref_chosen_logps.shape:
            raise ValueError(
                f"alpha has shape {tuple(alpha.shape)}, expected a float or shape "
                f"{tuple(ref_chosen_logps.shape)} like ref_chosen_logps"
            )
        check_same_device(ref_chosen_logps=ref_chosen_logps, alpha=alpha)
        check_finite(alpha=alpha)
        alpha = alpha.to(dtype)
        if not bool(((alpha > 0) & (alpha < 1)).all()):
            raise ValueError("alpha must lie strictly between 0 and 1")
    else:
        check_number("alpha", alpha, minimum=0.0, inclusive=False, maximum=1.0)
        if alpha == 1.0:
            raise ValueError("alpha must lie strictly between 0 and 1, got 1.0")
        alpha = torch.full_like(ref_chosen_logps, alpha, dtype=dtype)
    log_odds = torch.log(alpha) - torch.log1p(-alpha)
    ref_gap = ref_chosen_logps.to(dtype) - ref_rejected_logps.to(dtype)
    return ref_gap + log_odds / beta > 0


def idealized_ranking_accuracy(
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    alpha: torch.Tensor | float,
    *,
    beta: float,
) -> float:
    """Fraction of pairs the ideal policy ranks correctly (:func:`idealized_ranked_correctly`)."""
    correct = idealized_ranked_correctly(ref_chosen_logps, ref_rejected_logps, alpha, beta=beta)
    return int(correct.sum()) / correct.numel()


def ranking_groups(ref_correct: torch.Tensor, now_correct: torch.Tensor) -> dict[str, float]:
    """Chen et al.'s four groups: the reference right or wrong, crossed with the current model.

    Args:
        ref_correct: bool, shape ``(B,)``: the reference ranks the pair correctly.
        now_correct: bool, shape ``(B,)``: the current model ranks it correctly.

    Returns:
        Fractions of all pairs in each group, keyed by :data:`GROUPS`
        (e.g. ``"ref_incorrect/now_correct"``), plus ``"flip_rate"``: the fraction of the
        reference's misranked pairs the current model ranks correctly (NaN if there are none).

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    _check_bool_pair(ref_correct=ref_correct, now_correct=now_correct)
    n = ref_correct.numel()
    counts = {
        GROUPS[0]: int((ref_correct & now_correct).sum()),
        GROUPS[1]: int((ref_correct & ~now_correct).sum()),
        GROUPS[2]: int((~ref_correct & now_correct).sum()),
        GROUPS[3]: int((~ref_correct & ~now_correct).sum()),
    }
    misranked = counts[GROUPS[2]] + counts[GROUPS[3]]
    table = {name: count / n for name, count in counts.items()}
    table["flip_rate"] = counts[GROUPS[2]] / misranked if misranked else float("nan")
    return table


def gradient_share(
    z: torch.Tensor,
    group: torch.Tensor,
    *,
    gamma: float = 0.0,
    detach_weight: bool = False,
) -> float:
    """Share of the batch's gradient mass sum_i |w(z_i)| that falls on the pairs in ``group``.

    w is :func:`focalpo_mini.gradient_weight`: sigma(-z) for DPO (``gamma=0``). The absolute
    value matters only for FocalPO with the factor in the graph, where w turns negative for
    p < e^(-1/gamma).

    Args:
        z: preference logits, shape ``(B,)``.
        group: bool, shape ``(B,)``: the pairs whose share to return (e.g. the reference's
            misranked pairs).
        gamma, detach_weight: as in :func:`focalpo_mini.gradient_weight`.

    Returns:
        A float in [0, 1], or NaN when the batch has no gradient mass at all (every w(z_i) is 0,
        e.g. underflowed for a very large gamma).

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    detach_weight = check_flag("detach_weight", detach_weight)
    weight = gradient_weight(z, gamma=gamma, detach_weight=detach_weight).abs()
    _check_bool_pair(group=group)
    if group.shape != z.shape:
        raise ValueError(f"group has shape {tuple(group.shape)}, expected {tuple(z.shape)} like z")
    check_same_device(z=z, group=group)
    total = weight.sum()
    return (weight[group].sum() / total).item() if total > 0 else float("nan")


def _check_bool_pair(**tensors: torch.Tensor) -> None:
    shapes = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != torch.bool or tensor.dim() != 1 or tensor.numel() == 0:
            raise TypeError(
                f"{name} must be a non-empty 1-D bool tensor, got {tensor.dtype} "
                f"of shape {tuple(tensor.shape)}"
            )
        shapes.add(tuple(tensor.shape))
    if len(shapes) > 1:
        raise ValueError(f"{' and '.join(tensors)} must have the same shape, got {sorted(shapes)}")
    check_same_device(**tensors)
