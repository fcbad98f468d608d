"""Generated answers in the tiny world, scored by the exact judge ``true_reward``.

The FocalPO paper's claims are about generated answers (AlpacaEval 2 and Arena-Hard win rates),
so the book measures answers too: :func:`greedy_answers` decodes held-out prompts in padded
batches with a KV cache, :func:`answer_quality` scores them (mean true reward, exactly sorted,
invalid, and the win rate against a baseline's answers to the same prompts, ties counting one
half: AlpacaEval's quantity with an exact judge), and :func:`sampled_kl` estimates the KL
divergence from the reference on the same prompts.
"""

from __future__ import annotations

import statistics

import torch

from focalpo_mini._checks import check_int, compute_dtype, first_parameter
from focalpo_mini.data import true_reward
from focalpo_mini.pairs import _check_tokenizer, pad_token_id


def _texts(name: str, values: object, *, allow_empty: bool = False) -> list[str]:
    """``values`` as a list of str: a list or tuple of strings (NumPy strings included); a single
    string is refused, since iterating it would give one prompt per character."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        hint = f" (for one text, pass [{values!r}])" if isinstance(values, str) else ""
        raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}{hint}")
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise TypeError(
            f"{name}[{bad}] must be a string, got {type(values[bad]).__name__} {values[bad]!r}"
        )
    if not values and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return [str(v) for v in values]


def _left_padded(tokenizer, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """Prompts tokenised as in training (no special tokens added), padded on the left."""
    ids = [tokenizer(text=p)["input_ids"] for p in prompts]
    width, pad = max(len(i) for i in ids), pad_token_id(tokenizer)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, i in enumerate(ids):
        input_ids[row, width - len(i) :] = torch.tensor(i)
        attention_mask[row, width - len(i) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int = 16, batch_size: int = 64
) -> list[str]:
    """Greedy completions of plain-text ``prompts``, decoded without special tokens.

    Batches are left-padded so that every prompt ends where generation starts; a test checks that
    each answer equals the one generated for its prompt alone. The model is left in the mode it
    was in, even when generation raises.

    Raises:
        TypeError, ValueError: for a bad argument (``prompts`` must be a non-empty list of
            strings, not one string; ``max_new_tokens`` and ``batch_size`` integers >= 1).
    """
    prompts = _texts("prompts", prompts)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    device = first_parameter("model", model).device
    _check_tokenizer(tokenizer)
    _check_prompt_tokens(tokenizer, prompts)
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = _left_padded(tokenizer, prompts[start : start + batch_size], device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
            )
            new = output[:, inputs["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [a.strip() for a in answers]


def _check_prompt_tokens(tokenizer, prompts: list[str]) -> None:
    empty = next((i for i, p in enumerate(prompts) if not tokenizer(text=p)["input_ids"]), None)
    if empty is not None:
        raise ValueError(
            f"prompts[{empty}] = {prompts[empty]!r} tokenises to no token: nothing to continue"
        )


def answer_quality(
    prompts: list[str], answers: list[str], baseline_answers: list[str] | None = None
) -> dict[str, float]:
    """Scores of ``answers`` to ``prompts`` under the exact judge :func:`true_reward`.

    Returns ``true_reward`` (mean, in [-1, 1]), ``sorted`` (fraction exactly sorted, reward 1),
    ``invalid`` (fraction that is not a permutation of the prompt's digits, reward -1) and, with
    ``baseline_answers`` to the same prompts, ``win_rate``: the fraction of prompts on which the
    answer's true reward beats the baseline's, ties counting one half.

    Raises:
        TypeError: unless ``prompts``, ``answers`` and ``baseline_answers`` are lists (or
            tuples) of strings; a single string is refused.
        ValueError: for no prompts, or not one answer per prompt.
    """
    prompts, answers = _texts("prompts", prompts), _texts("answers", answers, allow_empty=True)
    if baseline_answers is not None:
        baseline_answers = _texts("baseline_answers", baseline_answers, allow_empty=True)
    if len(answers) != len(prompts) or not prompts:
        raise ValueError(
            f"need one answer per prompt, got {len(answers)} answers for {len(prompts)} prompts"
        )
    rewards = [true_reward(p, a) for p, a in zip(prompts, answers, strict=True)]
    scores = {
        "true_reward": statistics.fmean(rewards),
        "sorted": sum(r == 1.0 for r in rewards) / len(rewards),
        "invalid": sum(r == -1.0 for r in rewards) / len(rewards),
    }
    if baseline_answers is not None:
        if len(baseline_answers) != len(prompts):
            raise ValueError(
                f"baseline_answers has {len(baseline_answers)} answers for {len(prompts)} prompts"
            )
        base = [true_reward(p, a) for p, a in zip(prompts, baseline_answers, strict=True)]
        wins = [
            1.0 if r > b else 0.5 if r == b else 0.0 for r, b in zip(rewards, base, strict=True)
        ]
        scores["win_rate"] = statistics.fmean(wins)
    return scores


@torch.no_grad()
def sampled_kl(
    model,
    reference,
    tokenizer,
    prompts: list[str],
    *,
    seed: int = 0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> float:
    """Monte-Carlo estimate of the mean KL(pi_theta || pi_ref) over ``prompts``, in nats.

    One completion per prompt is sampled from ``model`` (temperature 1, until eos or
    ``max_new_tokens``); the estimate is the mean of log pi_theta(y|x) - log pi_ref(y|x) over
    them, with both log-probs summed over the sampled tokens, eos included. It is unbiased for
    the KL of the truncated completions; single samples are noisy, so it is read as a mean over
    many prompts. Sampling uses its own generator state (``seed``); the global RNG is restored,
    and so are the modes (training or eval) of ``model`` and ``reference``, even when it raises.

    Raises:
        TypeError, ValueError: for a bad argument (``prompts`` a non-empty list of strings;
            ``seed`` an integer >= 0; ``max_new_tokens``, ``batch_size`` integers >= 1).
    """
    prompts = _texts("prompts", prompts)
    seed = check_int("seed", seed, 0, maximum=2**63 - 1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    first_parameter("model", model)
    first_parameter("reference", reference)
    _check_tokenizer(tokenizer)
    _check_prompt_tokens(tokenizer, prompts)
    modes = [(m, m.training) for m in (model, reference)]
    try:
        model.eval()
        reference.eval()
        return _sampled_kl(model, reference, tokenizer, prompts, seed, max_new_tokens, batch_size)
    finally:
        for module, was_training in modes:
            module.train(was_training)


def _sampled_kl(model, reference, tokenizer, prompts, seed, max_new_tokens, batch_size) -> float:
    device = next(model.parameters()).device
    pad, eos = pad_token_id(tokenizer), tokenizer.eos_token_id
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            inputs = _left_padded(tokenizer, prompts[start : start + batch_size], device)
            width = inputs["input_ids"].shape[1]
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            new = output[:, width:]
            # completion tokens up to and including the first eos
            done_before = torch.cumsum((new == eos).long(), dim=1) - (new == eos).long()
            completion = (done_before == 0).long()
            attention = torch.cat([inputs["attention_mask"], completion], dim=1)
            mask = torch.cat([torch.zeros_like(inputs["attention_mask"]), completion], dim=1)
            total += float(
                (
                    _token_logps(model, output, attention, mask)
                    - _token_logps(reference, output, attention, mask)
                ).sum()
            )
    return total / len(prompts)


def _token_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Summed log-probs of the completion tokens of each (left-padded) row, shape (R,)."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits[:, :-1]
    logps = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), -1)
    token = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token * completion_mask[:, 1:]).sum(dim=1)
