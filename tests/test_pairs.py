"""Preference pairs: tokenised and collated exactly as TRL 1.16 does, the truncation policy with
its counts, and log-probs of whole datasets that do not depend on how the pairs are batched."""

import copy
import warnings

import pytest
import torch
from datasets import Dataset

from focalpo_mini.data import make_preference_dataset
from focalpo_mini.pairs import collate, pair_logps, prepare_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def trl_batch(model, tokenizer, dataset, max_length):
    """TRL 1.16's own tokenisation (DPOTrainer._prepare_dataset) and collator, on ``dataset``."""
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    args = DPOConfig(
        output_dir="/tmp/focalpo-trl-collation",
        max_length=max_length,
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    examples = list(trainer.train_dataset)
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    return collator.torch_call(examples)


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("max_length", [1024, 14])
def test_collation_equals_trl(tokenizer, small_model, conversational, max_length):
    dataset = make_preference_dataset(12, seed=3, conversational=conversational, max_len=8)
    expected = trl_batch(small_model(), tokenizer, dataset, max_length)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs, _, stats = prepare_pairs(tokenizer, dataset, max_length=max_length)
    batch = collate(pairs, tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], expected[key]), key
    cut = stats["truncated"] + stats["dropped_prompt_too_long"]
    assert (cut > 0) == (max_length == 14) == bool(caught)


def test_collation_by_hand(tokenizer):
    eos = tokenizer.eos_token_id
    ids = {"prompt_ids": [7, 8, 9], "chosen_ids": [10, eos], "rejected_ids": [11, 12, 13, eos]}
    other = {"prompt_ids": [5], "chosen_ids": [6, eos], "rejected_ids": [eos]}
    batch = collate([ids, other], pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [7, 8, 9, 10, eos, 0, 0],  # chosen rows first
        [5, 6, eos, 0, 0, 0, 0],
        [7, 8, 9, 11, 12, 13, eos],  # then rejected rows
        [5, eos, 0, 0, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0, 0],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1],
        [0, 1, 0, 0, 0, 0, 0],
    ]


def test_completions_end_with_eos(tokenizer):
    plain = make_preference_dataset(4, seed=0)
    chat = make_preference_dataset(4, seed=0, conversational=True)
    for dataset in (plain, chat):  # TRL adds eos to plain text; the chat template closes the turn
        pairs, _, _ = prepare_pairs(tokenizer, dataset, max_length=1024)
        for pair, row in zip(pairs, plain, strict=True):
            assert tokenizer.decode(pair["chosen_ids"]) == row["chosen"] + tokenizer.eos_token


def test_identical_pairs_are_skipped_with_a_count(tokenizer):
    rows = make_preference_dataset(12, seed=0).to_list()
    for i in (2, 5):
        rows[i]["rejected"] = rows[i]["chosen"]
    with pytest.warns(UserWarning, match="skipped 2 pair"):
        pairs, kept, stats = prepare_pairs(tokenizer, Dataset.from_list(rows), max_length=1024)
    assert stats["identical_skipped"] == 2 and len(pairs) == 10
    assert kept == [i for i in range(12) if i not in (2, 5)]


def test_long_prompts_follow_the_documented_policy(tokenizer):
    rows = make_preference_dataset(6, seed=0).to_list()
    rows[1]["prompt"] = "sort: " + "9 8 7 6 5 4 3 2 1 0 " * 6 + "\n"
    dataset = Dataset.from_list(rows)
    long_prompt = tokenizer(text=rows[1]["prompt"])["input_ids"]
    assert len(long_prompt) >= 40
    with pytest.warns(UserWarning, match=r"dropped 1 pair\(s\) whose prompt fills max_length=40"):
        pairs, kept, stats = prepare_pairs(tokenizer, dataset, max_length=40)
    assert 1 not in kept and stats["dropped_prompt_too_long"] == 1
    with pytest.warns(UserWarning, match=r"truncated 1 pair\(s\), cutting \d+ prompt token"):
        pairs, kept, stats = prepare_pairs(tokenizer, dataset, max_length=40, max_prompt_length=30)
    assert kept == list(range(6)) and stats["truncated"] == 1
    cut = pairs[1]
    assert stats["prompt_tokens_cut"] == len(long_prompt) - 30
    assert cut["prompt_ids"] == long_prompt[-30:]  # the prompt keeps its end
    assert len(cut["prompt_ids"]) + len(cut["chosen_ids"]) <= 40


def test_pair_logps_marks_skipped_rows_nan(tokenizer, small_model):
    rows = make_preference_dataset(3, seed=0).to_list()
    rows[1]["rejected"] = rows[1]["chosen"]
    with pytest.warns(UserWarning, match="skipped 1 pair"):
        chosen, rejected = pair_logps(small_model(), tokenizer, Dataset.from_list(rows))
    assert torch.isnan(chosen).tolist() == [False, True, False]
    assert torch.isnan(rejected).tolist() == [False, True, False]


def test_pair_logps_do_not_depend_on_the_batching(tokenizer, small_model):
    """Right padding and the chosen/rejected stacking must not change any pair's log-prob."""
    model, dataset = small_model(), make_preference_dataset(9, seed=2)
    one_by_one = pair_logps(model, tokenizer, dataset, batch_size=1)
    all_at_once = pair_logps(model, tokenizer, dataset, batch_size=9)
    for a, b in zip(one_by_one, all_at_once, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert model.training  # pair_logps restores the mode it found
