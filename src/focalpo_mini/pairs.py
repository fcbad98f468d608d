"""Preference pairs as token ids: tokenised as TRL 1.16's DPOTrainer does, truncated, collated
into right-padded batches for :mod:`focalpo_mini.trainer` and :mod:`focalpo_mini.sft`, and scored
(their completions' log-probs under a model, chosen and rejected in one forward pass).

Truncation policy. A sequence is prompt + completion. If ``max_prompt_length`` is set, a longer
prompt keeps its last ``max_prompt_length`` tokens (cut from the left: the prompt's end is next to
the completion). Then a sequence longer than ``max_length`` loses completion tokens from the right.
A pair whose prompt alone fills ``max_length`` has no completion token left and is dropped. With
``max_prompt_length=None`` this is TRL 1.16's ``truncation_mode="keep_start"`` exactly.
:func:`prepare_pairs` counts every cut and warns with the counts.

Degenerate pairs. A pair whose chosen and rejected token ids are the same once tokenised and
truncated (the same text; ``"1 2 3"`` against ``"1 2 3<|eos|>"``, since eos is appended; or two
completions that share a prefix longer than the room ``max_length`` leaves) has a loss gradient of
exactly 0: it is skipped and counted, with a warning that gives the share.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch

from focalpo_mini._checks import check_int, compute_dtype, first_parameter
from focalpo_mini.logprobs import sequence_logps

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
MESSAGE_KEYS = ("role", "content")


def tokenize_pair(tokenizer, example: dict) -> dict[str, list[int]]:
    """Token ids of one pair, as TRL 1.16's DPOTrainer makes them.

    Plain text: eos is appended to each completion (unless already there) and prompt,
    prompt+chosen and prompt+rejected are tokenised. Conversational (lists of messages): the chat
    template renders the prompt with ``add_generation_prompt=True`` and the full conversations
    without; the template closes each turn, so no eos is added. The completion starts where the
    prompt's ids and the full ids first differ (shortest of the two), as in TRL.

    Returns:
        ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: lists of token ids.

    Raises:
        TypeError, ValueError: for an example :func:`check_example` refuses.
    """
    _check_tokenizer(tokenizer)
    check_example(example, "example")
    prompt_ids, chosen_full = _encode(tokenizer, example["prompt"], example["chosen"])
    _, rejected_full = _encode(tokenizer, example["prompt"], example["rejected"])
    n = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
    return {
        "prompt_ids": prompt_ids[:n],
        "chosen_ids": chosen_full[n:],
        "rejected_ids": rejected_full[n:],
    }


def tokenize_completion(tokenizer, prompt, completion) -> dict[str, list[int]]:
    """``prompt_ids`` and ``completion_ids`` of one prompt/completion, tokenised like a pair's.

    Raises TypeError or ValueError, naming ``prompt`` or ``completion``, unless both are strings
    or both lists of ``{"role", "content"}`` messages, with a non-empty completion."""
    _check_tokenizer(tokenizer)
    check_example(
        {"prompt": prompt, "completion": completion},
        "tokenize_completion",
        ("prompt", "completion"),
    )
    prompt_ids, full = _encode(tokenizer, prompt, completion)
    n = _common_prefix(prompt_ids, full)
    return {"prompt_ids": prompt_ids[:n], "completion_ids": full[n:]}


def prepare_pairs(
    tokenizer,
    dataset,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    name: str = "dataset",
) -> tuple[list[dict[str, list[int]]], list[int], dict[str, int]]:
    """Validate, tokenise and truncate a preference dataset (the module docstring has the policy).

    ``dataset`` is a ``datasets.Dataset``, a list of row dicts, a dict of column lists or a pandas
    DataFrame. Each row holds ``prompt``, ``chosen`` and ``rejected``: three strings, or three
    lists of ``{"role", "content"}`` messages.

    Raises TypeError or ValueError, naming the row, for a missing column, a value that is neither
    text nor messages, a row mixing the two forms, a message without ``role``/``content``, an
    empty completion, or a prompt that tokenises to nothing. Warns, with counts, about pairs
    skipped because chosen and rejected are the same (as text or as truncated token ids) and
    about truncation.

    Returns:
        ``(pairs, rows, stats)``: the kept pairs (dicts of ``prompt_ids``/``chosen_ids``/
        ``rejected_ids``), the dataset row of each, and the counts ``pairs``, ``identical_skipped``,
        ``truncated``, ``dropped_prompt_too_long``, ``prompt_tokens_cut``,
        ``completion_tokens_cut``.
    """
    _check_tokenizer(tokenizer)
    max_length = check_int("max_length", max_length, 1)
    if max_prompt_length is not None:
        max_prompt_length = check_int("max_prompt_length", max_prompt_length, 1)
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    examples = _rows(dataset, name)
    stats = dict.fromkeys(
        (
            "pairs",
            "identical_skipped",
            "truncated",
            "dropped_prompt_too_long",
            "prompt_tokens_cut",
            "completion_tokens_cut",
        ),
        0,
    )
    pairs, rows = [], []
    for i, example in enumerate(examples):
        check_example(example, f"{name} row {i}")
        if example["chosen"] == example["rejected"]:
            stats["identical_skipped"] += 1
            continue
        tokenized = tokenize_pair(tokenizer, example)
        if not tokenized["prompt_ids"]:
            raise ValueError(
                f"{name} row {i}: the prompt tokenises to no token, so nothing predicts the "
                "first completion token (this tokenizer adds no BOS token); give every pair a "
                "non-empty prompt"
            )
        pair = _truncate(tokenized, max_length, max_prompt_length, stats)
        if pair is None:
            continue
        if pair["chosen_ids"] == pair["rejected_ids"]:  # the same tokens: a gradient of 0
            stats["identical_skipped"] += 1
            continue
        pairs.append(pair)
        rows.append(i)
    stats["pairs"] = len(pairs)
    if stats["identical_skipped"]:
        share = stats["identical_skipped"] / len(examples)
        warnings.warn(
            f"{name}: skipped {stats['identical_skipped']} pair(s) of {len(examples)} "
            f"({share:.0%}) with chosen == rejected, as text or as token ids after "
            f"tokenisation and truncation to max_length={max_length}"
            + ("; check the data and max_length" if share >= 0.1 else ""),
            stacklevel=2,
        )
    if stats["truncated"] or stats["dropped_prompt_too_long"]:
        warnings.warn(
            f"{name}: dropped {stats['dropped_prompt_too_long']} pair(s) whose prompt fills "
            f"max_length={max_length}; truncated {stats['truncated']} pair(s), cutting "
            f"{stats['prompt_tokens_cut']} prompt token(s) from the left and "
            f"{stats['completion_tokens_cut']} completion token(s) from the right",
            stacklevel=2,
        )
    return pairs, rows, stats


def check_example(example, where: str, columns: Sequence[str] = REQUIRED_COLUMNS) -> None:
    """Raise TypeError or ValueError, starting with ``where`` (e.g. ``"train_dataset row 3"``),
    unless ``example`` is a preference row: ``prompt``, ``chosen`` and ``rejected`` (or the
    given ``columns``: a prompt, then completions) all strings, or all lists of
    ``{"role", "content"}`` messages, with non-empty completions."""
    if not isinstance(example, Mapping):
        raise TypeError(
            f"{where} is a {type(example).__name__}; expected a dict with columns {list(columns)}"
        )
    missing = [c for c in columns if c not in example]
    if missing:
        raise ValueError(f"{where} is missing column(s) {missing}; found columns {list(example)}")
    kinds = {}
    for column in columns:
        value = example[column]
        if isinstance(value, str):
            kinds[column] = "a string"
        elif isinstance(value, list):
            kinds[column] = "a list of messages"
            _check_messages(value, f"{where}: {column}")
        else:
            raise TypeError(
                f"{where}: {column} must be a string or a list of {{'role', 'content'}} "
                f"messages, got {type(value).__name__} {value!r}"
            )
    if isinstance(example[columns[0]], list) and not example[columns[0]]:
        raise ValueError(
            f"{where}: {columns[0]} is an empty list of messages; a conversational prompt needs "
            "at least one message"
        )
    if len(set(kinds.values())) > 1:
        found = ", ".join(f"{c} is {k}" for c, k in kinds.items())
        raise ValueError(
            f"{where} mixes plain and conversational fields ({found}); use strings only or "
            "lists of messages only"
        )
    for column in columns[1:]:
        if not _text(example[column]).strip():
            raise ValueError(f"{where}: the {column} completion is empty")


def collate_completions(rows: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion rows (dicts of ``prompt_ids``, ``completion_ids``).

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` and
    ``completion_mask`` (1 on completion tokens), each of shape ``(R, T)``, ``T`` the longest row.
    """
    pad_token_id = check_int("pad_token_id", pad_token_id, 0)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    if not rows:
        raise ValueError("rows is empty: a batch needs at least one row")
    for i, row in enumerate(rows):
        _check_ids(row, f"rows[{i}]", ("prompt_ids", "completion_ids"))
    length = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n, end = len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r["completion_ids"])
        input_ids[i, :end] = torch.tensor(r["prompt_ids"] + r["completion_ids"])
        attention_mask[i, :end] = 1
        completion_mask[i, n:end] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


def collate(pairs: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of B pairs as 2B right-padded rows: chosen rows 0..B-1 over rejected rows B..2B-1.

    The same layout as TRL's ``DataCollatorForPreference``; see :func:`collate_completions`.
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a list of dicts, got {type(pairs).__name__}")
    if not pairs:
        raise ValueError("pairs is empty: a batch needs at least one pair")
    for i, pair in enumerate(pairs):
        _check_ids(pair, f"pairs[{i}]", ("prompt_ids", "chosen_ids", "rejected_ids"))
    chosen = [{"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"]} for p in pairs]
    rejected = [{"prompt_ids": p["prompt_ids"], "completion_ids": p["rejected_ids"]} for p in pairs]
    return collate_completions(chosen + rejected, pad_token_id)


def _check_ids(row: object, where: str, keys: tuple[str, ...]) -> None:
    """TypeError naming ``where`` unless ``row`` maps each of ``keys`` to a list of token ids."""
    if not isinstance(row, Mapping) or set(keys) - set(row):
        raise TypeError(f"{where} must be a dict with the keys {list(keys)}, got {row!r:.80}")
    for key in keys:
        ids = row[key]
        if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise TypeError(f"{where}[{key!r}] must be a list of token ids (ints >= 0)")


def _check_batch(batch: object, keys: tuple[str, ...]) -> None:
    """TypeError naming ``batch`` unless it is a dict of tensors holding ``keys``."""
    if not isinstance(batch, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in batch.values()
    ):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    missing = sorted(set(keys) - set(batch))
    if missing:
        raise ValueError(f"batch is missing {missing}; collate() builds a batch")


def _check_tokenizer(tokenizer) -> None:
    """TypeError unless ``tokenizer`` looks like a Hugging Face tokenizer (callable, with
    ``eos_token`` and ``apply_chat_template``)."""
    if not callable(tokenizer) or not hasattr(tokenizer, "eos_token"):
        raise TypeError(
            "tokenizer must be a Hugging Face tokenizer (callable, with an eos_token), got "
            f"{type(tokenizer).__name__}"
        )


def _check_vocabulary(name: str, model, pairs: Sequence[dict], where: str) -> None:
    """ValueError when a token id of ``pairs`` is beyond ``model``'s input embedding (a
    tokenizer bigger than the model's vocabulary, or a model built for another tokenizer)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None or not pairs:
        return
    largest = max(max(p[k], default=-1) for p in pairs for k in p)
    if largest >= rows:
        raise ValueError(
            f"{where} has token id {largest}, but {name}'s input embedding has only {rows} rows: "
            f"the tokenizer's vocabulary is larger than the model's; build the model for this "
            "tokenizer (focalpo_mini.make_model(tokenizer))"
        )


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token id, or its eos token id if it has no pad token."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = getattr(tokenizer, "eos_token_id", None) if pad_id is None else pad_id
    if pad_id is None:
        raise ValueError(
            f"tokenizer ({type(tokenizer).__name__}) has neither a pad_token_id nor an "
            "eos_token_id; a Hugging Face tokenizer with an eos token is expected"
        )
    return pad_id


def _encode(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    if isinstance(prompt, list):

        def ids(messages, **kwargs):
            return tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, **kwargs
            )["input_ids"]

        return ids(prompt, add_generation_prompt=True), ids(prompt + completion)
    if not isinstance(tokenizer.eos_token, str) or not tokenizer.eos_token:
        raise ValueError(
            f"tokenizer has no eos_token (got {tokenizer.eos_token!r}); plain-text pairs need one, "
            "since it ends every completion: set tokenizer.eos_token"
        )
    if not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    return tokenizer(text=prompt)["input_ids"], tokenizer(text=prompt + completion)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _truncate(pair, max_length: int, max_prompt_length: int | None, stats: dict) -> dict | None:
    prompt = pair["prompt_ids"]
    prompt_cut = 0
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt_cut = len(prompt) - max_prompt_length
        prompt = prompt[-max_prompt_length:]
    if len(prompt) >= max_length:
        stats["dropped_prompt_too_long"] += 1
        return None
    room = max_length - len(prompt)
    completion_cut = sum(max(0, len(pair[k]) - room) for k in ("chosen_ids", "rejected_ids"))
    if prompt_cut or completion_cut:
        stats["truncated"] += 1
        stats["prompt_tokens_cut"] += prompt_cut
        stats["completion_tokens_cut"] += completion_cut
    return {
        "prompt_ids": prompt,
        "chosen_ids": pair["chosen_ids"][:room],
        "rejected_ids": pair["rejected_ids"][:room],
    }


def _text(completion) -> str:
    if isinstance(completion, list):
        return "".join(m["content"] for m in completion)
    return completion


def _check_messages(messages: list, where: str) -> None:
    for j, message in enumerate(messages):
        # None counts as absent: an Arrow dataset fills every message with all keys seen
        keys = (
            [k for k, v in message.items() if v is not None] if isinstance(message, Mapping) else []
        )
        if set(MESSAGE_KEYS) - set(keys):
            keys = sorted(keys) if isinstance(message, Mapping) else type(message).__name__
            raise ValueError(
                f"{where}, message {j}: has {keys}; expected a dict with keys "
                f"{list(MESSAGE_KEYS)} (ShareGPT-style {{'from', 'value'}} messages must be "
                "converted first)"
            )
        if not isinstance(message["content"], str) or not isinstance(message["role"], str):
            raise TypeError(f"{where}, message {j}: role and content must be strings")


def _rows(dataset, name: str):
    """The rows of a dataset, each a dict; see :func:`prepare_pairs` for what is accepted."""
    if isinstance(dataset, Mapping):  # columns
        if any(isinstance(v, str) or not isinstance(v, Sequence) for v in dataset.values()):
            raise TypeError(
                f"{name} is a dict whose values are not lists; a dict must map each column to "
                "a list of values (for a single row, pass a list holding that dict)"
            )
        lengths = {column: len(values) for column, values in dataset.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{name}: the columns have different lengths {lengths}")
        n = next(iter(lengths.values()), 0)
        return [{column: values[i] for column, values in dataset.items()} for i in range(n)]
    if hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):  # a pandas DataFrame
        return dataset.to_dict(orient="records")
    if isinstance(dataset, (str, bytes)) or not (
        hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    ):
        raise TypeError(
            f"{name} must be a datasets.Dataset, a list of dicts, a dict of lists or a pandas "
            f"DataFrame, got {type(dataset).__name__}"
        )
    return dataset


# --- Log-probs of pairs under a model -------------------------------------------------------


def batch_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs ``(chosen, rejected)``, each ``(B,)``, from ONE forward pass."""
    first_parameter("model", model)
    _check_batch(batch, ("input_ids", "attention_mask", "completion_mask"))
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"]).chunk(2)


def pair_logps(
    model,
    tokenizer,
    dataset,
    *,
    max_length: int = 1024,
    max_prompt_length: int | None = None,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of every pair under ``model`` (eval mode, no gradients).

    Returns ``(chosen, rejected)``, each ``(len(dataset),)`` in nats; NaN for a row that
    :func:`prepare_pairs` skips (chosen == rejected, or a prompt that fills ``max_length``).
    An empty dataset gives two empty tensors.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    first_parameter("model", model)
    pairs, rows, _ = prepare_pairs(
        tokenizer, dataset, max_length=max_length, max_prompt_length=max_prompt_length
    )
    chosen, rejected = all_pair_logps(model, pairs, batch_size, pad_token_id(tokenizer))
    out = torch.full((2, len(_rows(dataset, "dataset"))), math.nan, dtype=chosen.dtype)
    out[:, rows] = torch.stack([chosen, rejected])
    return out[0], out[1]


def all_pair_logps(model, pairs, batch_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs, each ``(len(pairs),)``, of tokenised ``pairs`` (from
    :func:`prepare_pairs`), in order, ``batch_size`` at a time, in eval mode without autograd.
    The model's mode is restored afterwards, even after an error or an interrupt."""
    parameter = first_parameter("model", model)
    batch_size, pad_id = check_int("batch_size", batch_size, 1), check_int("pad_id", pad_id, 0)
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a list of dicts, got {type(pairs).__name__}")
    if not pairs:
        empty = torch.empty(0, dtype=compute_dtype(parameter.dtype), device=parameter.device)
        return empty, empty.clone()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = [
                batch_logps(
                    model, to_device(collate(pairs[i : i + batch_size], pad_id), parameter.device)
                )
                for i in range(0, len(pairs), batch_size)
            ]
    finally:
        model.train(was_training)
    # cloned outside inference mode, so autograd may use them as constants later
    return tuple(torch.cat([p[k] for p in parts]).clone() for k in (0, 1))


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The batch with every tensor moved to ``device``."""
    _check_batch(batch, ())
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device or a string, got {type(device).__name__}")
    return {k: v.to(device) for k, v in batch.items()}
