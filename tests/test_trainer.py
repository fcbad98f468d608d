"""The from-scratch trainer: the cached reference, metrics, loss plug-ins, gradient accumulation,
bit-identical resume, and clear errors on bad input (collation is in test_pairs.py)."""

import copy
import math

import pytest
import torch
from datasets import Dataset

from focalpo_mini.checkpoint import read as read_checkpoint
from focalpo_mini.data import make_preference_dataset
from focalpo_mini.losses import focalpo_loss
from focalpo_mini.pairs import pair_logps
from focalpo_mini.trainer import TrainConfig, train

TRL_NAMES = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    base = {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 4, "log_every": 1}
    return TrainConfig(**{**base, "progress": False, **overrides})


def same(a, b):
    """Exact equality of two history dicts, with NaN equal to NaN (an empty group)."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a
    )


def naive_logps(model, tokenizer, dataset):
    """Log-probs one pair at a time, unpadded, with log_softmax: independent of the trainer."""
    out = []
    with torch.no_grad():
        for row in dataset:
            for column in ("chosen", "rejected"):
                prompt = tokenizer(text=row["prompt"])["input_ids"]
                full = tokenizer(text=row["prompt"] + row[column] + tokenizer.eos_token)
                full = torch.tensor([full["input_ids"]])
                logp = model(input_ids=full).logits.log_softmax(-1)[0, :-1]
                token_logps = logp.gather(-1, full[0, 1:, None])[:, 0]
                out.append(token_logps[len(prompt) - 1 :].sum())
    return torch.stack(out).view(-1, 2).T


def test_reference_cache_equals_a_separate_no_grad_computation(tokenizer, small_model):
    model = small_model()
    initial = copy.deepcopy(model)
    train_set, eval_set = make_preference_dataset(16, seed=0), make_preference_dataset(8, seed=1)
    result = train(
        model, tokenizer, train_set, eval_set, config=config(max_steps=2, record_eval_pairs=True)
    )
    expected_chosen, expected_rejected = naive_logps(initial, tokenizer, eval_set)
    first, last = result.eval_pairs[0], result.eval_pairs[-1]
    for record in (first, last):  # the reference never moves
        torch.testing.assert_close(record["ref_chosen_logps"], expected_chosen, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            record["ref_rejected_logps"], expected_rejected, atol=1e-4, rtol=0
        )
    assert torch.equal(first["policy_chosen_logps"], first["ref_chosen_logps"])
    assert torch.equal(first["z"], torch.zeros(8))
    assert not torch.equal(last["policy_chosen_logps"], last["ref_chosen_logps"])
    assert first["index"].tolist() == list(range(8))
    chosen, rejected = pair_logps(initial, tokenizer, eval_set)
    torch.testing.assert_close(chosen, expected_chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(rejected, expected_rejected, atol=1e-4, rtol=0)


def test_loss_decreases_and_metrics_are_named_like_trl(tokenizer, small_model):
    model = small_model()
    dataset = make_preference_dataset(64, seed=0)
    result = train(
        model,
        tokenizer,
        dataset,
        config=config(max_steps=40, log_every=10, gamma=0.5, learning_rate=5e-3),
    )
    first = train(small_model(), tokenizer, dataset, config=config(max_steps=1, gamma=0.5)).history[
        0
    ]
    # policy == reference at the first step: z = 0, p = 1/2, loss = 0.5**gamma * ln 2
    assert first["loss"] == pytest.approx(0.5**0.5 * math.log(2), abs=1e-5)
    assert first["focal/weight_mean"] == pytest.approx(0.5**0.5, abs=1e-5)
    steps, losses = result.series("loss")
    assert steps == [10, 20, 30, 40]
    assert losses[-1] < 0.5 * first["loss"]
    names = set(result.metric_names())
    assert {*TRL_NAMES, "focal/weight_mean", "learning_rate", "grad_norm", "num_tokens"} <= names
    for group in ("ref_correct", "ref_incorrect"):
        for key in ("count", "reward_accuracy", "ranking_accuracy", "margin"):
            assert f"groups/{group}/{key}" in names
    with pytest.raises(KeyError, match="logged"):
        result.series("reward")


@pytest.fixture
def run(tokenizer, small_model):
    """``run(dataset, **config_overrides)``: train a fresh small model; its TrainResult."""

    def train_fresh(dataset, **overrides):
        return train(small_model(), tokenizer, dataset, config=config(**overrides))

    return train_fresh


def test_loss_plugins(run):
    dataset = make_preference_dataset(32, seed=0)
    dpo = run(dataset, loss="dpo").history
    focal_zero = run(dataset, loss="focalpo", gamma=0.0).history
    focal = run(dataset, loss="focalpo", gamma=0.5).history
    calls = []

    def my_loss(*logps, **kwargs):
        calls.append(kwargs)
        return focalpo_loss(*logps, **kwargs)

    custom = run(dataset, loss=my_loss, gamma=0.5, detach_weight=True).history
    detached = run(dataset, loss="focalpo", gamma=0.5, detach_weight=True).history
    assert all(same(a, b) for a, b in zip(dpo, focal_zero, strict=True))  # gamma = 0 is DPO exactly
    assert all(same(a, b) for a, b in zip(custom, detached, strict=True))
    assert focal[0]["loss"] != dpo[0]["loss"]
    assert focal[-1]["rewards/margins"] != detached[-1]["rewards/margins"]
    assert calls[0] == {"beta": 0.1, "gamma": 0.5, "detach_weight": True, "reduction": "mean"}


def test_gradient_accumulation_matches_one_big_batch(tokenizer, small_model):
    dataset = make_preference_dataset(32, seed=0)
    big, accumulated = small_model(), small_model()
    one = train(big, tokenizer, dataset, config=config(batch_size=16, max_steps=3)).history
    two = train(
        accumulated,
        tokenizer,
        dataset,
        config=config(batch_size=8, grad_accum_steps=2, max_steps=3),
    ).history
    for a, b in zip(one, two, strict=True):
        for name in TRL_NAMES:
            assert a[name] == pytest.approx(b[name], abs=1e-5), name
    for p, q in zip(big.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


class InterruptAt:
    """A FocalPO loss that raises KeyboardInterrupt on its ``call``-th call (never if None)."""

    def __init__(self, call=None):
        self.call, self.calls = call, 0

    def __call__(self, *logps, **kwargs):
        self.calls += 1
        if self.calls == self.call:
            raise KeyboardInterrupt
        return focalpo_loss(*logps, **kwargs)


def test_interrupted_run_resumes_bit_identically(tokenizer, tmp_path, small_model):
    dataset = make_preference_dataset(24, seed=0)  # 3 micro-batches per epoch: epochs roll over
    settings = {"grad_accum_steps": 2, "max_steps": 8, "log_every": 3, "warmup_steps": 2}
    uninterrupted_model = small_model()
    uninterrupted = train(
        uninterrupted_model, tokenizer, dataset, config=config(loss=InterruptAt(), **settings)
    )
    # the 11th loss call is in step 6 (2 calls per step): steps 1-5 are complete
    interrupted = config(
        loss=InterruptAt(11), checkpoint_dir=str(tmp_path), checkpoint_every=2, **settings
    )
    with pytest.raises(KeyboardInterrupt):
        train(small_model(), tokenizer, dataset, config=interrupted)
    checkpoint = read_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["progress"]["step"] == 5
    assert checkpoint["data_position"] == {"epoch": 3, "batch": 1}  # 10 micro-batches of 3 a epoch
    assert not list(tmp_path.glob("*.tmp"))

    resumed_model = small_model(seed=1)  # its weights are replaced by the checkpoint's
    resumed_config = config(loss=InterruptAt(), **settings)
    resumed = train(resumed_model, tokenizer, dataset, config=resumed_config, resume_from=tmp_path)
    assert [h["step"] for h in resumed.history] == [3, 6, 8]
    assert all(same(a, b) for a, b in zip(uninterrupted.history, resumed.history, strict=True))
    for p, q in zip(uninterrupted_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resume_with_a_different_config_names_the_fields(tokenizer, tmp_path, small_model, run):
    dataset = make_preference_dataset(16, seed=0)
    run(dataset, max_steps=2, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    changed = config(max_steps=2, beta=0.2, gamma=1.0, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"beta \(checkpoint 0.1, now 0.2\), gamma"):
        train(small_model(), tokenizer, dataset, config=changed, resume_from=tmp_path)
    other_data = make_preference_dataset(16, seed=1)
    with pytest.raises(ValueError, match="train_dataset differs"):
        train(
            small_model(), tokenizer, other_data, config=config(max_steps=2),
            resume_from=tmp_path,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"has splits \['train'\], now \['eval', 'train'\]"):
        train(
            small_model(), tokenizer, dataset, dataset, config=config(max_steps=2),
            resume_from=tmp_path,
        )  # fmt: skip
    # logging and checkpointing fields may change; the run is already complete
    result = train(
        small_model(), tokenizer, dataset, config=config(max_steps=2, log_every=5),
        resume_from=tmp_path / "checkpoint.pt",
    )  # fmt: skip
    assert [h["step"] for h in result.history] == [1, 2]


def test_conversational_data_trains(run):
    dataset = make_preference_dataset(16, seed=0, conversational=True)
    result = run(dataset, max_steps=2)
    assert len(result.history) == 2 and all(math.isfinite(h["loss"]) for h in result.history)


# --- Bad input --------------------------------------------------------------------------------


def test_missing_columns_lists_the_columns_found(run):
    dataset = Dataset.from_dict({"prompt": ["a"], "answer": ["b"], "rejected": ["c"]})
    with pytest.raises(ValueError, match=r"missing column\(s\) \['chosen'\].*\['prompt', 'answer'"):
        run(dataset)


@pytest.mark.parametrize("conversational", [False, True])
def test_empty_completion_names_the_row(conversational, run):
    rows = make_preference_dataset(5, seed=0, conversational=conversational).to_list()
    if conversational:
        rows[3]["rejected"] = [{"role": "assistant", "content": ""}]
    else:
        rows[3]["rejected"] = ""
    with pytest.raises(ValueError, match="row 3: the rejected completion is empty"):
        run(Dataset.from_list(rows))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("beta", 0.0, "beta must be"),
        ("gamma", -1.0, "gamma must be"),
        ("loss", "kto", "loss must be"),
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("max_prompt_length", 2000, "max_prompt_length must be < max_length"),
        ("checkpoint_every", 5, "needs a checkpoint_dir"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_too_few_pairs_for_a_batch(run):
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        run(make_preference_dataset(5, seed=0))


def test_plot_helpers_draw_the_logged_series(run):
    import matplotlib.pyplot as plt

    from focalpo_mini.viz import plot_groups, plot_training

    dataset = make_preference_dataset(16, seed=0)
    runs = {
        "dpo": run(dataset, loss="dpo"),
        "focalpo": run(dataset),
    }
    fig = plot_training(runs, ["loss", "groups/ref_correct/margin"], title="FocalPO vs DPO")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["dpo", "focalpo"]
    assert list(lines[1].get_ydata()) == runs["focalpo"].series("loss")[1]
    ax = plot_groups(runs["dpo"], "ranking_accuracy", split="train")
    correct = runs["dpo"].series("groups/ref_correct/ranking_accuracy")[1]
    assert list(ax.get_lines()[0].get_ydata()) == correct
    plt.close("all")
