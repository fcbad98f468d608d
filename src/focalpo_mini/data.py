"""The tiny world's preference data: a sorting task whose true reward is known exactly.

A prompt asks to sort a few distinct digits (``"sort: 4 1 3 2\\n"``); a completion is a list of
digits (``"1 2 3 4"``). The ground-truth reward of a completion is how sorted it is, so every
chapter can measure *true* accuracy, not only agreement with (possibly noisy) labels.
"""

from __future__ import annotations

import random

from datasets import Dataset

from focalpo_mini._checks import check_flag, check_int, check_number

PROMPT_PREFIX = "sort: "


def true_reward(prompt: str, completion: str) -> float:
    """Ground-truth reward of ``completion`` for a sorting ``prompt``, in [-1, 1].

    For a permutation of the prompt's digits the reward is ``1 - inversions / max_inversions``:
    1.0 when sorted ascending, 0.0 when sorted descending. Anything that is not a permutation of
    the prompt's digits (a digit missing, added or repeated, or stray text) gets -1.0. Only the
    ASCII digits 0-9 are digits: any other text, other scripts' digits ("١ ٢ ٣", "１ ２ ３") and
    superscripts included, is an invalid answer (-1.0), and an invalid prompt gives -1.0 too.
    Any string is accepted and never raises; a value that is neither a string nor a list of
    ``{"role", "content"}`` messages raises TypeError naming ``prompt`` or ``completion``.

    >>> true_reward("sort: 3 1 2\\n", "1 2 3")
    1.0
    >>> true_reward("sort: 3 1 2\\n", "3 2 1")
    0.0
    """
    prompt, completion = _message_text("prompt", prompt), _message_text("completion", completion)
    digits = _parse_digits(prompt.strip().removeprefix(PROMPT_PREFIX.strip()))
    answer = _parse_digits(completion)
    if digits is None or answer is None or sorted(answer) != sorted(digits):
        return -1.0
    return 1.0 - _inversions(answer) / _max_inversions(len(answer))


def make_preference_dataset(
    n: int,
    *,
    seed: int = 0,
    noise: float = 0.0,
    conversational: bool = False,
    min_len: int = 3,
    max_len: int = 6,
) -> Dataset:
    """Synthetic preference pairs for the sorting task, in TRL's prompt/chosen/rejected format.

    Each pair compares two permutations of the prompt's digits with different true rewards. Half of
    the time the better one is the fully sorted answer; otherwise both are imperfect, so the task
    has easy and hard pairs. ``noise`` is the fraction of pairs whose labels are swapped (exactly
    ``round(noise * n)`` of them, chosen at random).

    Columns:
        prompt, chosen, rejected: strings, or lists of ``{"role", "content"}`` messages when
            ``conversational=True`` (prompt holds the user turn, chosen/rejected one assistant
            turn).
        chosen_reward, rejected_reward: the true rewards of the completions *as labelled*.
        label_flipped: True where noise swapped the pair, i.e. ``chosen_reward < rejected_reward``.

    Raises:
        TypeError, ValueError: if ``n`` is not an integer >= 1, ``noise`` a number in [0, 1],
            ``seed`` an integer, ``conversational`` a bool, or the lengths integers with
            2 <= min_len <= max_len <= 10; the message names the argument.
    """
    n = check_int("n", n, 1)
    noise = check_number("noise", noise, minimum=0.0, maximum=1.0)
    seed = check_int("seed", seed, 0)
    conversational = check_flag("conversational", conversational)
    min_len, max_len = check_int("min_len", min_len, 2), check_int("max_len", max_len, 2)
    if not 2 <= min_len <= max_len <= 10:
        raise ValueError(
            "min_len and max_len must satisfy 2 <= min_len <= max_len <= 10, "
            f"got {min_len}, {max_len}"
        )
    rng = random.Random(seed)
    rows = [_make_pair(rng, rng.randint(min_len, max_len)) for _ in range(n)]
    for i in rng.sample(range(n), round(noise * n)):
        row = rows[i]
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["chosen_reward"], row["rejected_reward"] = row["rejected_reward"], row["chosen_reward"]
        row["label_flipped"] = True
    if conversational:
        for row in rows:
            row["prompt"] = [{"role": "user", "content": row["prompt"].rstrip("\n")}]
            row["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
            row["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
    return Dataset.from_list(rows)


def tokenizer_corpus(n: int = 4000, *, seed: int = 1234) -> list[str]:
    """Texts of the sorting task (a prompt and a completion each) to train the tokenizer on.

    Raises:
        TypeError, ValueError: unless ``n`` is an integer >= 1 and ``seed`` one >= 0.
    """
    n, seed = check_int("n", n, 1), check_int("seed", seed, 0)
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        digits = rng.sample(range(10), rng.randint(2, 10))
        answer = rng.sample(digits, len(digits)) if rng.random() < 0.5 else sorted(digits)
        texts.append(_prompt(digits) + _fmt(answer))
    return texts


def _message_text(name: str, value) -> str:
    """A string, or the content of the last message of a conversational value."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    elif isinstance(value, str):
        value = str(value)  # a NumPy string becomes a plain one
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string or a list of {{'role', 'content'}} messages, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def _make_pair(rng: random.Random, length: int) -> dict:
    digits = rng.sample(range(10), length)
    prompt = _prompt(digits)
    while True:
        if rng.random() < 0.5:
            better = sorted(digits)
        else:
            better = rng.sample(digits, length)
        worse = rng.sample(digits, length)
        r_better, r_worse = _reward_of(better), _reward_of(worse)
        if r_better != r_worse:
            break
    if r_better < r_worse:
        better, worse, r_better, r_worse = worse, better, r_worse, r_better
    return {
        "prompt": prompt,
        "chosen": _fmt(better),
        "rejected": _fmt(worse),
        "chosen_reward": r_better,
        "rejected_reward": r_worse,
        "label_flipped": False,
    }


def _prompt(digits: list[int]) -> str:
    return f"{PROMPT_PREFIX}{_fmt(digits)}\n"


def _fmt(digits: list[int]) -> str:
    return " ".join(str(d) for d in digits)


ASCII_DIGITS = "0123456789"


def _parse_digits(text: str) -> list[int] | None:
    """The single ASCII digits of ``text`` separated by whitespace, or None for any other text
    (other scripts' digits such as "١" or "１", superscripts such as "²", and "12" included)."""
    parts = text.split()
    if not parts or not all(len(p) == 1 and p in ASCII_DIGITS for p in parts):
        return None
    return [ASCII_DIGITS.index(p) for p in parts]


def _inversions(seq: list[int]) -> int:
    return sum(1 for i in range(len(seq)) for j in range(i + 1, len(seq)) if seq[i] > seq[j])


def _max_inversions(length: int) -> int:
    return max(1, length * (length - 1) // 2)


def _reward_of(seq: list[int]) -> float:
    return 1.0 - _inversions(seq) / _max_inversions(len(seq))
