"""The tiny world: tokenizer, model and synthetic preference data."""

import pytest
import torch

from focalpo_mini.data import make_preference_dataset, true_reward
from focalpo_mini.tiny import make_model, make_tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "sort: 4 1 3 2\n1 2 3 4",
        "Hello, world! Ünïcödé ✓ and tabs\tand\nnewlines",
        "  leading spaces",
        "",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_has_special_tokens_and_chat_template(tokenizer):
    assert {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token} == {
        "<|pad|>",
        "<|bos|>",
        "<|eos|>",
    }
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    messages = [
        {"role": "user", "content": "sort: 3 1 2"},
        {"role": "assistant", "content": "1 2 3"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|user|>sort: 3 1 2<|eos|><|assistant|>1 2 3<|eos|>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(prompt) and prompt.endswith("<|assistant|>")


def test_tokenizer_is_deterministic(tokenizer):
    again = make_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    text = "sort: 9 8 7 6 5\n5 6 7 8 9"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        make_tokenizer(vocab_size=100)


def test_make_model_same_seed_same_weights(tokenizer):
    a, b = make_model(tokenizer, seed=3), make_model(tokenizer, seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_make_model_different_seed_different_weights(tokenizer):
    a, b = make_model(tokenizer, seed=0), make_model(tokenizer, seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_make_model_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_model(tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_make_model_size_and_overrides(tokenizer):
    model = make_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    assert 3e5 < n_params < 3e6
    assert model.config.vocab_size == len(tokenizer)
    small = make_model(tokenizer, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    assert small.config.num_hidden_layers == 1
    assert sum(p.numel() for p in small.parameters()) < n_params
    logits = model(torch.tensor([tokenizer("sort: 1 2")["input_ids"]])).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_make_model_rejects_unknown_override(tokenizer):
    with pytest.raises(ValueError, match="hiden_size"):
        make_model(tokenizer, hiden_size=64)


@pytest.mark.parametrize("conversational", [False, True])
def test_dataset_schema(conversational):
    ds = make_preference_dataset(20, conversational=conversational)
    assert len(ds) == 20
    for column in ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"]:
        assert column in ds.column_names
    row = ds[0]
    if conversational:
        assert row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["role"] == "assistant"
        assert row["rejected"][0]["role"] == "assistant"
    else:
        assert isinstance(row["prompt"], str) and row["prompt"].startswith("sort: ")
        assert isinstance(row["chosen"], str) and isinstance(row["rejected"], str)


def test_dataset_same_seed_same_rows():
    assert (
        make_preference_dataset(50, seed=4).to_list()
        == make_preference_dataset(50, seed=4).to_list()
    )
    assert (
        make_preference_dataset(50, seed=4).to_list()
        != make_preference_dataset(50, seed=5).to_list()
    )


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.25, 0.5])
def test_dataset_flip_rate_matches_noise(noise):
    ds = make_preference_dataset(2000, seed=11, noise=noise)
    flipped = [c < r for c, r in zip(ds["chosen_reward"], ds["rejected_reward"], strict=True)]
    assert abs(sum(flipped) / len(ds) - noise) <= 0.03
    assert flipped == ds["label_flipped"]


def test_dataset_rewards_are_the_true_rewards_when_noiseless():
    ds = make_preference_dataset(300, seed=2, noise=0.0)
    for row in ds:
        assert true_reward(row["prompt"], row["chosen"]) == row["chosen_reward"]
        assert true_reward(row["prompt"], row["rejected"]) == row["rejected_reward"]
        assert row["chosen_reward"] > row["rejected_reward"]


def test_true_reward_scores_sortedness():
    assert true_reward("sort: 3 1 2\n", "1 2 3") == 1.0
    assert true_reward("sort: 3 1 2\n", "3 2 1") == 0.0
    assert true_reward("sort: 3 1 2\n", "2 1 3") == pytest.approx(2 / 3)
    assert true_reward("sort: 3 1 2\n", "1 2") == -1.0
    assert true_reward("sort: 3 1 2\n", "1 2 2") == -1.0
    assert true_reward("sort: 3 1 2\n", "one two") == -1.0
    assert true_reward([{"role": "user", "content": "sort: 2 1"}], [{"content": "1 2"}]) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 0}, "n"),
        ({"n": -5}, "n"),
        ({"n": 10, "noise": -0.1}, "noise"),
        ({"n": 10, "noise": 1.5}, "noise"),
        ({"n": 10, "min_len": 5, "max_len": 3}, "min_len"),
    ],
)
def test_dataset_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_preference_dataset(**kwargs)
