"""The usual remedies for noisy preference labels, as baselines for FocalPO: cDPO, robust DPO, IPO.

Each takes the four summed log-probs of a batch of pairs, like :func:`focalpo_mini.dpo_loss`, and
is computed in log space. ``label_smoothing`` (written eps below) is the assumed probability that a
pair's label is flipped; with z = beta * h from :func:`focalpo_mini.preference_logits`:

- conservative DPO (Mitchell, 2023): -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), the
  cross-entropy against the soft label 1 - eps. Its gradient vanishes at p = 1 - eps instead of
  p = 1, so no pair is pushed to an infinite margin.
- robust DPO (Chowdhury et al., 2024):
  [-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)] / (1 - 2 eps),
  an unbiased estimate of the clean-label DPO loss when labels flip with probability eps.
- IPO (Azar et al., 2024): (h_bar - 1 / (2 beta))**2, a squared loss that pulls the length-averaged
  log-ratio difference h_bar to a finite target instead of pushing it to infinity.

The formulas are TRL 1.16's ``loss_type="robust"`` and ``"ipo"`` (IPO on log-probs averaged over
completion tokens, as TRL does); TRL 1.16 has no cDPO (its ``"sigmoid"`` ignores
``label_smoothing``), so cDPO is checked against ``binary_cross_entropy_with_logits`` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from focalpo_mini._checks import (
    NonFiniteError,
    check_finite,
    check_number,
    check_reduction,
    check_same_device,
    check_same_shape,
)
from focalpo_mini.losses import _preference_logits, _reduce


def conservative_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Conservative DPO: DPO against the soft label ``1 - label_smoothing``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: shape
            ``(B,)``, summed completion log-probs.
        beta: strength of the KL constraint, ``> 0``.
        label_smoothing: assumed flip probability, in [0, 0.5]; 0 is DPO.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(B,)``).

    Returns:
        The loss in the promoted dtype of the inputs (float32 for half precision).
    """
    eps = check_number("label_smoothing", label_smoothing, minimum=0.0, maximum=0.5)
    check_reduction(reduction)
    z, dtype = _preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    loss = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return _reduce(loss, reduction).to(dtype)


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Robust DPO: the DPO loss de-biased for labels that flip with probability ``label_smoothing``.

    The ``+ eps log sigmoid(-z)`` term has no lower bound, so unlike DPO the loss can go below 0.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: shape
            ``(B,)``, summed completion log-probs.
        beta: strength of the KL constraint, ``> 0``.
        label_smoothing: assumed flip probability, in [0, 0.5) (TRL's range); 0 is DPO.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(B,)``).

    Returns:
        The loss in the promoted dtype of the inputs (float32 for half precision).
    """
    eps = check_number("label_smoothing", label_smoothing, minimum=0.0, maximum=0.5)
    if eps == 0.5:
        raise ValueError("label_smoothing must be < 0.5 for robust DPO, got 0.5")
    check_reduction(reduction)
    z, dtype = _preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    loss = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _reduce(loss, reduction).to(dtype)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """IPO: the squared distance of the per-token log-ratio difference from ``1 / (2 beta)``.

    ``h_bar = (log pi/pi_ref)(y_w) / len(y_w) - (log pi/pi_ref)(y_l) / len(y_l)``; here beta is
    IPO's regulariser tau (a larger beta asks for a smaller margin).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: shape
            ``(B,)``, summed completion log-probs.
        chosen_lengths, rejected_lengths: shape ``(B,)``, the number of completion tokens of each
            completion (lengths below 1 count as 1, as in TRL).
        beta: IPO's regulariser, ``> 0``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(B,)``).

    Returns:
        The loss in the promoted dtype of the inputs (float32 for half precision).

    Raises:
        TypeError, ValueError: for a bad argument (lengths must be finite, real and dense);
            NonFiniteError (a ValueError) naming beta when the loss overflows the dtype.
    """
    beta = check_number("beta", beta, minimum=0.0, inclusive=False)
    check_reduction(reduction)
    _, dtype = _preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=1.0
    )
    for name, lengths in (
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
    ):
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(lengths).__name__}")
        if lengths.layout != torch.strided or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a dense real tensor of token counts, got {lengths.dtype} "
                f"({lengths.layout})"
            )
        check_same_shape("policy_chosen_logps", policy_chosen_logps, **{name: lengths})
        check_same_device(policy_chosen_logps=policy_chosen_logps, **{name: lengths})
        check_finite(**{name: lengths})
    # dtype is already the compute dtype (float32 for half inputs), as for every loss here
    chosen = (policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)) / chosen_lengths.to(
        dtype
    ).clamp(min=1.0)
    rejected = (
        policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    ) / rejected_lengths.to(dtype).clamp(min=1.0)
    loss = _reduce((chosen - rejected - 1.0 / (2.0 * beta)) ** 2, reduction).to(dtype)
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteError(
            f"the IPO loss overflows {dtype}, with beta = {beta}: the squared distance of the "
            "per-token log-ratio difference from 1 / (2 beta) must stay below "
            f"{torch.finfo(dtype).max:.3g} (log-probs or 1 / beta too large)"
        )
    return loss
