"""sequence_logps: equal to a naive per-token loop and to TRL 1.16's own log-probs."""

import pytest
import torch

from focalpo_mini.logprobs import sequence_logps


def naive_sequence_logps(logits, labels, completion_mask, average=False):
    """One token at a time: the logits at t-1 score the label at t, for completion tokens only."""
    results = []
    for b in range(logits.shape[0]):
        total, count = logits.new_zeros(()), 0
        for t in range(1, logits.shape[1]):
            if completion_mask[b, t]:
                total = total + torch.log_softmax(logits[b, t - 1], dim=-1)[labels[b, t]]
                count += 1
        results.append(total / count if average else total)
    return torch.stack(results)


def random_batch(dtype=torch.float64, seed=0, batch=4, length=9, vocab=13):
    """Random logits and a right-padded batch: prompt labels -100, padding labels = pad id."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, length, vocab, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    completion_mask = torch.zeros(batch, length, dtype=torch.int64)
    for b, (start, end) in enumerate([(3, 9), (1, 2), (4, 7), (2, 6)][:batch]):
        completion_mask[b, start:end] = 1
        labels[b, :start] = -100  # prompt positions: the ignore label, never read
        labels[b, end:] = vocab + 5  # padding past the vocabulary, never read either
    return logits, labels, completion_mask


@pytest.mark.parametrize("average", [False, True])
def test_equals_naive_loop_values_and_gradients(average):
    logits, labels, completion_mask = random_batch()
    logits.requires_grad_()
    got = sequence_logps(logits, labels, completion_mask, average=average)
    expected = naive_sequence_logps(logits, labels, completion_mask, average=average)
    assert got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (got_grad,) = torch.autograd.grad(got.sum(), logits)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_average_is_sum_over_completion_length():
    logits, labels, completion_mask = random_batch()
    lengths = completion_mask[:, 1:].sum(dim=1)
    torch.testing.assert_close(
        sequence_logps(logits, labels, completion_mask, average=True),
        sequence_logps(logits, labels, completion_mask) / lengths,
    )


def test_bool_and_integer_masks_agree():
    logits, labels, completion_mask = random_batch()
    torch.testing.assert_close(
        sequence_logps(logits, labels, completion_mask.bool()),
        sequence_logps(logits, labels, completion_mask),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_are_computed_and_returned_in_float32(dtype):
    logits, labels, completion_mask = random_batch(dtype=dtype)
    got = sequence_logps(logits, labels, completion_mask)
    assert got.dtype == torch.float32
    expected = naive_sequence_logps(logits.double(), labels, completion_mask)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)


# --- against TRL 1.16 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_step0(trl_step_zero):
    from focalpo_mini import make_preference_dataset

    return trl_step_zero(make_preference_dataset(6, seed=3))


def our_logps(tokenizer, seed, batch):
    """Our sequence_logps on a fresh copy of the model, from its ordinary (unfused) logits."""
    from focalpo_mini import make_model

    model = make_model(tokenizer, seed=seed).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"]).chunk(2)


def test_equals_trl_per_pair_log_probs(tokenizer, trl_step0):
    chosen, rejected = our_logps(tokenizer, 1, trl_step0["batch"])
    torch.testing.assert_close(chosen, trl_step0["ref_chosen_logps"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rejected, trl_step0["ref_rejected_logps"], rtol=1e-5, atol=1e-4)


def test_equals_trl_logged_step0_log_probs(tokenizer, trl_step0):
    chosen, rejected = our_logps(tokenizer, 0, trl_step0["batch"])
    logs = trl_step0["logs"]
    assert chosen.mean().item() == pytest.approx(logs["logps/chosen"], rel=1e-5)
    assert rejected.mean().item() == pytest.approx(logs["logps/rejected"], rel=1e-5)


# --- bad input -----------------------------------------------------------------------------------


def replaced(**changes):
    logits, labels, completion_mask = random_batch(dtype=torch.float32)
    inputs = {"logits": logits, "labels": labels, "completion_mask": completion_mask}
    for name, change in changes.items():
        inputs[name] = change(inputs[name])
    return inputs


def set_item(index, value):
    def change(tensor):
        tensor = tensor.clone()
        tensor[index] = value
        return tensor

    return change


@pytest.mark.parametrize(
    ("inputs", "error", "name"),
    [
        (replaced(logits=lambda x: x.long()), TypeError, "logits"),
        (replaced(logits=lambda x: x[0]), ValueError, "logits"),
        (replaced(logits=lambda x: x[:0]), ValueError, "logits"),
        (replaced(logits=set_item((1, 0, 2), float("nan"))), ValueError, "logits"),
        (replaced(logits=set_item((1, 0, 2), float("-inf"))), ValueError, "logits"),
        (replaced(labels=lambda x: x.float()), TypeError, "labels"),
        (replaced(labels=lambda x: x.bool()), TypeError, "labels"),
        (replaced(labels=lambda x: x[:, :-1]), ValueError, "labels"),
        (replaced(labels=lambda x: x.tolist()), TypeError, "labels"),
        (replaced(labels=set_item((0, 4), 13)), ValueError, "labels"),  # vocab is 13
        (replaced(labels=set_item((0, 4), -100)), ValueError, "labels"),
        (replaced(completion_mask=lambda m: m.float()), TypeError, "completion_mask"),
        (replaced(completion_mask=lambda m: m[:3]), ValueError, "completion_mask"),
        (replaced(completion_mask=set_item((0, 4), 2)), ValueError, "completion_mask"),
        (replaced(completion_mask=set_item((0, 0), 1)), ValueError, "completion_mask"),
        (replaced(completion_mask=set_item(1, 0)), ValueError, r"completion_mask.*\[1\]"),
    ],
)
def test_bad_inputs_are_rejected_naming_the_argument(inputs, error, name):
    with pytest.raises(error, match=name):
        sequence_logps(**inputs)


def test_bad_average_is_rejected():
    with pytest.raises(TypeError, match="average"):
        sequence_logps(**replaced(), average="yes")
