"""Generated answers: batched greedy decoding, the exact judge's scores, the sampled KL."""

import copy

import pytest
import torch

from focalpo_mini import make_preference_dataset
from focalpo_mini.generation import answer_quality, greedy_answers, sampled_kl


@pytest.fixture(scope="module")
def prompts():
    return list(make_preference_dataset(24, seed=5)["prompt"])


def test_batched_answers_equal_one_at_a_time(tokenizer, small_model, one_thread, prompts):
    model = small_model(seed=3)
    batched = greedy_answers(model, tokenizer, prompts, batch_size=7)
    alone = [greedy_answers(model, tokenizer, [p])[0] for p in prompts]
    assert batched == alone
    # prompts of different lengths were padded together, so left padding was exercised
    assert len({len(tokenizer(text=p)["input_ids"]) for p in prompts[:7]}) > 1


def test_greedy_answer_is_the_argmax_continuation(tokenizer, small_model, one_thread, prompts):
    """An independent decoder: repeated full forward passes, no cache, no padding."""
    model = small_model(seed=4).eval()
    prompt = prompts[0]
    ids = tokenizer(text=prompt)["input_ids"]
    for _ in range(16):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] == tokenizer.eos_token_id:
            break
    n = len(tokenizer(text=prompt)["input_ids"])
    expected = tokenizer.decode(ids[n:], skip_special_tokens=True).strip()
    assert greedy_answers(model, tokenizer, [prompt]) == [expected]


def test_mode_is_restored(tokenizer, small_model, prompts):
    model = small_model().train()
    greedy_answers(model, tokenizer, prompts[:2])
    assert model.training


def test_answer_quality_scores_and_win_rate():
    prompts = ["sort: 3 1 2\n", "sort: 2 1\n", "sort: 5 4 6\n", "sort: 9 8\n"]
    answers = ["1 2 3", "2 1", "4 5 6 6", "8 9"]
    baseline = ["1 3 2", "2 1", "4 5 6", "8 9"]
    q = answer_quality(prompts, answers, baseline)
    assert q["true_reward"] == pytest.approx((1.0 + 0.0 - 1.0 + 1.0) / 4)
    assert q["sorted"] == 0.5
    assert q["invalid"] == 0.25
    # win, tie, loss, tie
    assert q["win_rate"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert "win_rate" not in answer_quality(prompts, answers)


def test_answer_quality_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="one answer per prompt"):
        answer_quality(["sort: 1 2\n"], [])
    with pytest.raises(ValueError, match="baseline_answers"):
        answer_quality(["sort: 1 2\n"], ["1 2"], [])


def test_sampled_kl_is_exactly_zero_against_itself(tokenizer, small_model, one_thread, prompts):
    model = small_model(seed=0)
    assert sampled_kl(model, copy.deepcopy(model), tokenizer, prompts) == 0.0


def test_sampled_kl_matches_the_exact_kl_of_one_token(tokenizer, small_model, one_thread):
    """With max_new_tokens=1 the KL is a sum over the vocabulary. The estimate must lie within
    five standard errors of it (the standard error from the exact variance of the log-ratio)."""
    policy, reference = small_model(seed=0).eval(), small_model(seed=1).eval()
    with torch.no_grad():
        policy.lm_head.weight.mul_(8.0)  # a peaked policy: a KL of a few nats, not ~0
    prompt, n = "sort: 3 1 2\n", 800
    ids = torch.tensor([tokenizer(text=prompt)["input_ids"]])
    with torch.no_grad():
        log_p = torch.log_softmax(policy(input_ids=ids).logits[0, -1].double(), -1)
        log_q = torch.log_softmax(reference(input_ids=ids).logits[0, -1].double(), -1)
    p, ratio = log_p.exp(), log_p - log_q
    exact = float((p * ratio).sum())
    std = float((p * (ratio - exact) ** 2).sum().sqrt())
    estimate = sampled_kl(policy, reference, tokenizer, [prompt] * n, max_new_tokens=1)
    assert exact > 0.2
    assert abs(estimate - exact) < 5 * std / n**0.5
