"""Log-probability of a completion under a causal language model, from the model's logits."""

from __future__ import annotations

import torch

from focalpo_mini._checks import (
    NonFiniteError,
    check_flag,
    check_float_tensor,
    check_same_device,
    compute_dtype,
)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    average: bool = False,
) -> torch.Tensor:
    """Sum (or mean) of the log-probabilities of each row's completion tokens.

    A causal LM's logits at position t-1 predict the token at position t, so the label at t is
    scored with ``log_softmax(logits[:, t-1])``. Only positions where ``completion_mask`` is 1
    count; the prompt and the padding are left out. This is what DPO calls log pi(y|x).

    Only the completion positions are read. Labels outside the completion (prompt, padding, or
    the ignore label -100) may hold anything, and so may the logits that would predict them (NaN
    at padding positions is fine and gets no gradient); labels inside it must be valid token ids
    (any integer dtype) and their logits finite. Position 0 can never be a completion token,
    since no logits predict it.

    Computed in float32 for half-precision logits (float64 stays float64) and returned in that
    dtype, not cast back: a sum of many log-probs, later subtracted from the reference's, would
    lose most of its digits in bfloat16.

    Args:
        logits: shape ``(B, T, V)``, the model's output for ``labels``, floating point.
        labels: shape ``(B, T)``, integer token ids of any integer dtype (usually the model's
            ``input_ids``).
        completion_mask: shape ``(B, T)``, 1 (or True) at completion tokens, 0 elsewhere; every
            row needs at least one completion token.
        average: return the mean log-prob per completion token instead of the sum (SimPO-style).

    Returns:
        Shape ``(B,)``, in nats.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it.

    Example:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over a vocabulary of 4
        >>> labels = torch.tensor([[0, 1, 2]])
        >>> mask = torch.tensor([[0, 1, 1]])
        >>> sequence_logps(logits, labels, mask)  # 2 * log(1/4)
        tensor([-2.7726])
    """
    average = check_flag("average", average)
    check_float_tensor("logits", logits, ndim=3)
    batch, length, vocab = logits.shape
    _check_index_tensor("labels", labels, (batch, length), bool_ok=False)
    _check_index_tensor("completion_mask", completion_mask, (batch, length), bool_ok=True)
    check_same_device(logits=logits, labels=labels, completion_mask=completion_mask)
    if not bool(((completion_mask == 0) | (completion_mask == 1)).all()):
        raise ValueError("completion_mask must hold only 0 and 1")
    mask = completion_mask.bool()
    if bool(mask[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be 0: no logits predict the first token")
    mask = mask[:, 1:]
    counts = mask.sum(dim=1)
    if not bool((counts > 0).all()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"completion_mask has no completion token in row(s) {rows}")
    targets = labels[:, 1:][mask].long()  # gather needs int64 indices
    if not bool(((targets >= 0) & (targets < vocab)).all()):
        raise ValueError(f"labels at completion positions must be token ids in [0, {vocab})")

    # Only the completion positions: (N, V) rows of logits, N = number of completion tokens.
    scored = logits[:, :-1][mask].to(compute_dtype(logits.dtype))
    if not bool(torch.isfinite(torch.stack(torch.aminmax(scored))).all()):  # NaN propagates
        raise NonFiniteError("logits must be finite at completion positions, found NaN or inf")
    token_logps = scored.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - scored.logsumexp(-1)
    per_position = torch.zeros(mask.shape, dtype=token_logps.dtype, device=mask.device)
    total = per_position.masked_scatter(mask, token_logps).sum(dim=1)
    return total / counts if average else total


def _check_index_tensor(
    name: str, tensor: object, shape: tuple[int, int], *, bool_ok: bool
) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}")
    integer = not tensor.is_floating_point() and not tensor.is_complex()
    if not integer or (tensor.dtype == torch.bool and not bool_ok):
        expected = "a bool or integer" if bool_ok else "an integer"
        raise TypeError(f"{name} must have {expected} dtype, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{name} must have shape (B, T) = {shape} like logits, got {tuple(tensor.shape)}"
        )
