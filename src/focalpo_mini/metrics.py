"""Batch summaries of a preference step: TRL's DPOTrainer's names, and Chen et al.'s groups."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from focalpo_mini._checks import check_number, check_pair_logps, compute_dtype
from focalpo_mini.losses import preference_logits


@torch.no_grad()
def preference_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float | None = None,
) -> dict[str, float]:
    """Means over the batch of the quantities TRL 1.16's DPOTrainer logs, as Python floats.

    With the implicit rewards r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)) and
    r_l = beta (log pi(y_l|x) - log pi_ref(y_l|x)):

    - ``rewards/chosen``, ``rewards/rejected``: mean r_w, mean r_l;
    - ``rewards/margins``: mean of r_w - r_l, which is z of :func:`focalpo_mini.preference_logits`;
    - ``rewards/accuracies``: fraction of pairs with r_w > r_l (ties count as wrong, as in TRL);
    - ``logps/chosen``, ``logps/rejected``: mean policy log-probs of the completions;
    - ``focal/weight_mean`` (only when ``gamma`` is given): mean of the modulating factor
      p**gamma = sigmoid(z)**gamma, the fraction of each pair's DPO loss that FocalPO keeps
      (1 for DPO; this is the loss factor, not the gradient weight of
      :func:`focalpo_mini.gradient_weight`).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: shape
            ``(B,)``, summed completion log-probs.
        beta: strength of the KL constraint, ``> 0``.
        gamma: FocalPO's exponent, ``>= 0``, or None to leave out ``focal/weight_mean``.

    Returns:
        A dict from metric name to float.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.
    """
    if gamma is not None:
        gamma = check_number("gamma", gamma, minimum=0.0)
    beta = check_number("beta", beta, minimum=0.0, inclusive=False)
    input_dtype = check_pair_logps(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    dtype = compute_dtype(input_dtype)  # half-precision inputs are summarised in float32
    chosen_logps, rejected_logps = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps.to(dtype))
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps.to(dtype))
    margins = chosen_rewards - rejected_rewards  # z of focalpo_mini.preference_logits
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": chosen_logps.mean().item(),
        "logps/rejected": rejected_logps.mean().item(),
    }
    if gamma is not None:
        metrics["focal/weight_mean"] = torch.exp(gamma * F.logsigmoid(margins)).mean().item()
    return metrics


@torch.no_grad()
def group_metrics(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta
) -> dict[str, float]:
    """Chen et al.'s groups: pairs the reference ranks correctly (log pi_ref(y_w) >=
    log pi_ref(y_l)) or not. Per group: ``count``, ``reward_accuracy`` (z > 0), ``ranking_accuracy``
    (log pi(y_w) >= log pi(y_l)) and mean ``margin`` (z); NaN for an empty group."""
    z = preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    values = {
        "reward_accuracy": (z > 0).float(),
        "ranking_accuracy": (policy_chosen_logps >= policy_rejected_logps).float(),
        "margin": z,
    }
    ref_correct = ref_chosen_logps >= ref_rejected_logps
    out = {}
    for group, mask in (("ref_correct", ref_correct), ("ref_incorrect", ~ref_correct)):
        count = int(mask.sum())
        out[f"groups/{group}/count"] = float(count)
        for key, v in values.items():
            out[f"groups/{group}/{key}"] = v[mask].mean().item() if count else math.nan
    return out
