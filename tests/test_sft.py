"""supervised_finetune: completion-only cross-entropy, checked against F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from focalpo_mini.data import make_preference_dataset
from focalpo_mini.sft import supervised_finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def test_first_loss_is_the_completion_cross_entropy(tokenizer, small_model):
    dataset = make_preference_dataset(6, seed=0)
    model = small_model()
    initial = small_model()
    losses = supervised_finetune(model, tokenizer, dataset, steps=1, batch_size=4, seed=7)
    # the same rows the function draws, scored one at a time with ignore_index on the prompt
    idx = torch.randint(6, (4,), generator=torch.Generator().manual_seed(7)).tolist()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in idx:
            prompt = tokenizer(text=dataset[i]["prompt"])["input_ids"]
            text = dataset[i]["prompt"] + dataset[i]["chosen"] + tokenizer.eos_token
            ids = torch.tensor(tokenizer(text=text)["input_ids"])
            labels = ids.clone()
            labels[: len(prompt)] = -100
            logits = initial(input_ids=ids[None]).logits[0]
            total += F.cross_entropy(logits[:-1], labels[1:], reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    assert losses[0] == pytest.approx(total / count, abs=1e-5)


def test_loss_decreases_on_the_target_column(tokenizer, small_model):
    dataset = make_preference_dataset(64, seed=0)
    model = small_model()
    losses = supervised_finetune(
        model, tokenizer, dataset, steps=30, learning_rate=5e-3, target="rejected"
    )
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]


def test_bad_input(tokenizer, small_model):
    model = small_model()
    with pytest.raises(ValueError, match=r"row 0 is missing column\(s\) \['answer'\]; found"):
        supervised_finetune(model, tokenizer, make_preference_dataset(4), target="answer")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        supervised_finetune(model, tokenizer, make_preference_dataset(4), steps=0)
    long = Dataset.from_dict({"prompt": ["sort: 1 2 3 4 5 6 7 8 9\n"], "chosen": ["1"]})
    with (
        pytest.warns(UserWarning, match="dropped 1 row"),
        pytest.raises(ValueError, match="no usable"),
    ):
        supervised_finetune(model, tokenizer, long, max_length=3)
