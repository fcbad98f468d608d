"""Supervised fine-tuning on prompt + target completion: how the book makes its SFT reference."""

from __future__ import annotations

import warnings

import torch

from focalpo_mini._checks import check_int, check_number, first_parameter
from focalpo_mini.logprobs import sequence_logps
from focalpo_mini.pairs import (
    _check_tokenizer,
    _check_vocabulary,
    _rows,
    check_example,
    collate_completions,
    pad_token_id,
    tokenize_completion,
)


def supervised_finetune(
    model,
    tokenizer,
    dataset,
    *,
    steps: int = 100,
    learning_rate: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 1024,
    target: str = "chosen",
) -> list[float]:
    """Train ``model`` in place to produce ``dataset[target]`` after ``dataset["prompt"]``.

    The loss is the cross-entropy of the completion tokens only (prompt and padding are left
    out), averaged over the batch's completion tokens. Completions are tokenised as in
    :func:`focalpo_mini.pairs.tokenize_pair` (eos appended to plain text), so the model learns
    to stop. Sequences longer than ``max_length`` lose completion tokens from the right; rows
    whose prompt fills ``max_length`` are dropped with a warning. AdamW at a constant learning
    rate, gradients clipped to norm 1; batches are drawn with a generator seeded by ``seed``.
    ``dataset`` may be anything :func:`focalpo_mini.pairs.prepare_pairs` accepts, and its rows
    are validated the same way (naming the row).

    Returns:
        The loss of every step, in nats per token.

    Raises:
        TypeError, ValueError: for a missing column, a bad row or a bad argument.
    """
    steps, batch_size = check_int("steps", steps, 1), check_int("batch_size", batch_size, 1)
    max_length, seed = check_int("max_length", max_length, 1), check_int("seed", seed, 0)
    learning_rate = check_number("learning_rate", learning_rate, minimum=0.0, inclusive=False)
    device = first_parameter("model", model).device
    _check_tokenizer(tokenizer)
    seed = check_int("seed", seed, 0, maximum=2**63 - 1)
    if not isinstance(target, str):
        raise TypeError(f"target must be a column name (str), got {type(target).__name__}")
    examples = _rows(dataset, "dataset")
    if not len(examples):
        raise ValueError("dataset is empty: expected at least one row")

    rows, dropped = [], 0
    for i, example in enumerate(examples):
        check_example(example, f"dataset row {i}", columns=("prompt", target))
        row = tokenize_completion(tokenizer, example["prompt"], example[target])
        if not row["prompt_ids"]:
            raise ValueError(f"dataset row {i}: the prompt tokenises to no token")
        room = max_length - len(row["prompt_ids"])
        if room <= 0:
            dropped += 1
            continue
        rows.append({**row, "completion_ids": row["completion_ids"][:room]})
    if dropped:
        warnings.warn(f"dropped {dropped} row(s) whose prompt fills max_length", stacklevel=2)
    if not rows:
        raise ValueError("dataset has no usable row")

    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter that requires grad: nothing to train")
    _check_vocabulary("model", model, rows, "dataset")
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    pad_id = pad_token_id(tokenizer)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(rows), (min(batch_size, len(rows)),), generator=generator)
        batch = collate_completions([rows[i] for i in idx.tolist()], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        total = sequence_logps(logits, batch["input_ids"], batch["completion_mask"]).sum()
        loss = -total / batch["completion_mask"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
