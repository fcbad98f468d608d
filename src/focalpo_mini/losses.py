"""Focal loss, DPO and FocalPO, and the gradient weight each loss puts on a preference pair.

Every loss is computed in log space (``log p = logsigmoid(z)``, ``p**gamma = exp(gamma * log p)``),
so it stays finite for any logit.

Dtypes. Half-precision inputs (float16, bfloat16) are computed in float32, and every result,
reductions included, is returned in float32: a float16 sum of 200 pair losses of 400 nats each
already exceeds float16's largest value, 65504. float32 and float64 inputs are computed and
returned in their own dtype.

Range. A finite input can still overflow: the logit z = beta * h is refused with a ValueError
naming ``beta`` and the log-probs when it is not finite in the compute dtype (log-probs near
float32's limit of 3.4e38, or beta = 1e39), and ``gamma`` must not exceed the compute dtype's
largest value, so that every loss and its gradient are finite.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from focalpo_mini._checks import (
    NonFiniteError,
    check_finite,
    check_flag,
    check_float_tensor,
    check_number,
    check_pair_logps,
    check_reduction,
    check_same_device,
    check_same_shape,
    compute_dtype,
)

DEFAULT_FOCALPO_GAMMA = 0.5


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary sigmoid focal loss of Lin et al. (2017): FL = -alpha_t (1 - p_t)**gamma log p_t.

    ``p_t`` is the predicted probability of the true class: ``sigmoid(logits)`` where the target is
    1 and ``1 - sigmoid(logits)`` where it is 0. The factor ``(1 - p_t)**gamma`` shrinks the loss of
    well-classified examples, so training concentrates on the hard, misclassified ones (FocalPO
    does the opposite, see :func:`focalpo_loss`). ``alpha_t`` is ``alpha`` for positives and
    ``1 - alpha`` for negatives; ``alpha=None`` switches it off. With ``gamma=0`` and ``alpha=None``
    this is ``F.binary_cross_entropy_with_logits``. The defaults are Lin et al.'s.

    Args:
        logits: raw scores, any shape ``(*)``, floating point.
        targets: the classes, same shape as ``logits``, holding only 0 and 1 (bool, integer or
            floating dtype).
        gamma: focusing parameter, ``>= 0``.
        alpha: weight of the positive class in [0, 1], or None.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(*)``).

    Returns:
        The loss in ``logits.dtype`` (float32 for half-precision logits): a scalar, or shape
        ``(*)`` for ``reduction="none"``.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    gamma = check_number("gamma", gamma, minimum=0.0)
    if alpha is not None:
        alpha = check_number("alpha", alpha, minimum=0.0, maximum=1.0)
    check_reduction(reduction)
    check_float_tensor("logits", logits)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    check_same_shape("logits", logits, targets=targets)
    check_same_device(logits=logits, targets=targets)
    check_finite(logits=logits)
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError("targets must hold only 0 and 1")

    dtype = compute_dtype(logits.dtype)
    _check_gamma_fits(gamma, dtype)
    x = logits.to(dtype)
    positive = targets.bool()
    # log p_t = logsigmoid(s) and log(1 - p_t) = logsigmoid(-s), with s = x for positives, -x else.
    s = torch.where(positive, x, -x)
    loss = -torch.exp(gamma * F.logsigmoid(-s)) * F.logsigmoid(s)
    if alpha is not None:
        t = positive.to(x.dtype)
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return _reduce(loss, reduction)


def preference_logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """The Bradley-Terry logit z = beta * h of each pair, with p = sigmoid(z) the model's
    probability that the chosen completion beats the rejected one.

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)].
    DPO, FocalPO and the preference metrics all start from z.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: shape
            ``(B,)``, summed completion log-probs (see :func:`focalpo_mini.sequence_logps`).
        beta: strength of the KL constraint, ``> 0``.

    Returns:
        z, shape ``(B,)``, in the promoted dtype of the inputs (float32 for half precision).

    Raises:
        TypeError, ValueError: for a bad argument, or a z that is not finite; the message names
            the argument.
    """
    z, _ = _preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    return z


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """DPO loss of Rafailov et al. (2023): -log sigmoid(z), with z from :func:`preference_logits`.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: shape
            ``(B,)``, summed completion log-probs.
        beta: strength of the KL constraint, ``> 0``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (one loss per pair, shape ``(B,)``).

    Returns:
        The loss, a scalar or shape ``(B,)``, in the promoted dtype of the inputs (float32 for
        half precision).

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    check_reduction(reduction)
    z, _ = _preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    return -_reduce(F.logsigmoid(z), reduction)  # negate after reducing: one pass less


def focalpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    gamma: float = DEFAULT_FOCALPO_GAMMA,
    detach_weight: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """FocalPO loss (Liu et al., 2025): the DPO loss times p**gamma, i.e. -p**gamma log p.

    With p = sigmoid(z) and z from :func:`preference_logits`. Pairs correctly ranked by the
    implicit reward (z > 0, p > 1/2) keep most of their weight; pairs it misranks (p -> 0) are
    down-weighted. At step 0 the policy is the reference, so z = 0 and every pair has the same
    weight 0.5**gamma: the focus forms only as the margins move.
    ``gamma=0`` is DPO exactly. With ``detach_weight=True`` the factor p**gamma is a constant in
    the backward pass, so each pair's gradient is DPO's times p**gamma; with ``False`` the factor
    is differentiated too (see :func:`gradient_weight` for both gradients).

    Why ``gamma=0.5`` by default: this is our choice, not the paper's. The paper keeps one gamma
    fixed across its experiments, but its value is not known to us. With the factor in the graph,
    the gradient keeps DPO's sign only while p > exp(-1/gamma); for gamma = 0.5 that is
    p > exp(-2) ~ 0.135, so only pairs that are already badly misranked are pushed the wrong way
    (gamma = 1 moves the bound to ~ 0.37, gamma = 2 to ~ 0.61, past p = 1/2 where every pair
    starts when the policy equals the reference). At p = 1/2 the loss keeps 0.5**0.5 ~ 0.71 of
    DPO's, and the in-graph gradient 0.5**0.5 (1 - 0.5 ln 2) ~ 0.46 of DPO's: a clear but moderate
    change. ``detach_weight=False`` differentiates the loss as written; the book compares both.
    The book's small-experiment chapter tests these choices.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: shape
            ``(B,)``, summed completion log-probs.
        beta: strength of the KL constraint, ``> 0``.
        gamma: exponent of the modulating factor p**gamma, ``>= 0`` and at most the compute
            dtype's largest value (3.4e38 for float32).
        detach_weight: treat p**gamma as a constant in the backward pass.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (one loss per pair, shape ``(B,)``).

    Returns:
        The loss, a scalar or shape ``(B,)``, in the promoted dtype of the inputs (float32 for
        half precision).

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    gamma = check_number("gamma", gamma, minimum=0.0)
    detach_weight = check_flag("detach_weight", detach_weight)
    check_reduction(reduction)
    z, _ = _preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    _check_gamma_fits(gamma, z.dtype)
    log_p = F.logsigmoid(z)
    weight = torch.exp(gamma * log_p)
    if detach_weight:
        weight = weight.detach()
    return -_reduce(weight * log_p, reduction)  # negate after reducing: one pass less


def gradient_weight(
    z: torch.Tensor, *, gamma: float = 0.0, detach_weight: bool = False
) -> torch.Tensor:
    """The weight w(z) in dL/dz = -w(z): how hard one pair's loss pushes its logit z up.

    Derivation, with p = sigmoid(z), so dp/dz = p(1 - p) and d(log p)/dz = 1 - p:

    - DPO, L = -log p: dL/dz = -(1 - p), so w = 1 - p.
    - FocalPO, factor in the graph, L = -p**gamma log p. By the product rule,
      dL/dp = -gamma p**(gamma-1) log p - p**(gamma-1) = -p**(gamma-1) (1 + gamma log p);
      times dp/dz = p(1 - p) gives w = p**gamma (1 - p) (1 + gamma log p). It is negative, so
      the gradient pushes z *down*, when p < exp(-1/gamma).
    - FocalPO, factor detached, L = -sg(p**gamma) log p: only log p is differentiated, so
      w = p**gamma (1 - p), DPO's weight times p**gamma.

    gamma = 0 gives DPO's 1 - p in both modes. Computed in log space as
    exp(gamma logsigmoid(z) + logsigmoid(-z)) [* (1 + gamma logsigmoid(z))].

    Args:
        z: preference logits, any shape ``(*)``, floating point.
        gamma: exponent of the modulating factor, ``>= 0``.
        detach_weight: the weight of the detached-factor loss instead of the in-graph one.

    Returns:
        w(z), shape ``(*)``, in ``z.dtype`` (float32 for half precision).

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    gamma = check_number("gamma", gamma, minimum=0.0)
    detach_weight = check_flag("detach_weight", detach_weight)
    check_float_tensor("z", z)
    check_finite(z=z)
    dtype = compute_dtype(z.dtype)
    _check_gamma_fits(gamma, dtype)
    x = z.to(dtype)
    log_p = F.logsigmoid(x)
    weight = torch.exp(gamma * log_p + F.logsigmoid(-x))
    if not detach_weight:
        # Where p**gamma underflows to 0, 1 + gamma log p may be -inf: the product is 0, not NaN.
        weight = torch.where(weight > 0, weight * (1.0 + gamma * log_p), 0.0)
    return weight


def _preference_logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.dtype]:
    """Validate the inputs; return z and the dtype the losses compute and return in (float32
    for half inputs, the inputs' promoted dtype otherwise).

    Reference log-probs that require grad get a warning: the losses treat the reference as a
    constant, and a gradient flowing into it (a reference computed without ``torch.no_grad()``,
    or the policy itself) trains something that should stay fixed. Detach them to silence it.
    """
    beta = check_number("beta", beta, minimum=0.0, inclusive=False)
    dtype = compute_dtype(
        check_pair_logps(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
        )
    )
    needs_grad = [
        name
        for name, ref in (
            ("ref_chosen_logps", ref_chosen_logps),
            ("ref_rejected_logps", ref_rejected_logps),
        )
        if ref.requires_grad
    ]
    if needs_grad:
        warnings.warn(
            f"{' and '.join(needs_grad)} require(s) grad, so the loss sends gradients into the "
            "reference; pass ref.detach() if the reference is meant to stay fixed",
            stacklevel=3,
        )
    chosen_logratios = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)
    rejected_logratios = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    z = beta * (chosen_logratios - rejected_logratios)
    finite = torch.isfinite(z)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite).flatten()[:10].tolist()
        raise NonFiniteError(
            f"z = beta * h overflows {dtype} in pair(s) {rows}, with beta = {beta} and "
            "h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - "
            f"ref_rejected_logps); |beta * h| must stay below {torch.finfo(dtype).max:.3g}"
        )
    return z, dtype


def _check_gamma_fits(gamma: float, dtype: torch.dtype) -> None:
    """A gamma beyond the dtype's range becomes inf in ``gamma * log p``, and 0 * inf = NaN in
    the gradient."""
    check_number("gamma", gamma, minimum=0.0, maximum=torch.finfo(dtype).max)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
