"""Bad and degenerate inputs: each gets a right result or a clear error naming the argument, row
or column (never a silent wrong number, never an error from deep inside torch or Python).

Cases that once went wrong silently are asserted on their result; cryptic ones on
``pytest.raises(..., match=<the name>)``. Issue 15 lists them.
"""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from focalpo_mini import checkpoint
from focalpo_mini._checks import NonFiniteError
from focalpo_mini.data import make_preference_dataset, true_reward
from focalpo_mini.logprobs import sequence_logps
from focalpo_mini.losses import dpo_loss, focal_loss, focalpo_loss, gradient_weight
from focalpo_mini.metrics import preference_metrics
from focalpo_mini.pairs import pair_logps, prepare_pairs
from focalpo_mini.ranking import gradient_share, ranking_groups
from focalpo_mini.sft import supervised_finetune
from focalpo_mini.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(n=6, **kwargs):
    return make_preference_dataset(n, seed=0, **kwargs).to_list()


def prepare(tokenizer, dataset, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_pairs(tokenizer, dataset, **{"max_length": 1024, **kwargs})


# --- Pairs that train nothing ------------------------------------------------------------------


def test_pair_identical_after_tokenisation_is_skipped_and_counted(tokenizer):
    data = rows()
    data[2]["rejected"] = data[2]["chosen"] + tokenizer.eos_token  # eos is appended anyway
    with pytest.warns(UserWarning, match=r"skipped 1 pair\(s\) of 6 \(17%\)"):
        pairs, kept, stats = prepare_pairs(tokenizer, data, max_length=1024)
    assert stats["identical_skipped"] == 1 and kept == [0, 1, 3, 4, 5]
    assert all(p["chosen_ids"] != p["rejected_ids"] for p in pairs)


def test_pairs_identical_after_truncation_are_skipped(tokenizer):
    """Completions that share a prefix longer than the room max_length leaves."""
    data = rows(10)
    for row in data[:8]:
        row["chosen"], row["rejected"] = "0 1 2 3 4 5 6 7 8 9", "0 1 2 3 4 5 6 7 9 8"
    room = max(len(tokenizer(text=r["prompt"])["input_ids"]) for r in data) + 3
    with pytest.warns(UserWarning, match="check the data and max_length"):  # 80 % is a lot
        pairs, kept, stats = prepare_pairs(tokenizer, data, max_length=room)
    assert stats["identical_skipped"] == 8 and kept == [8, 9]
    assert all(p["chosen_ids"] != p["rejected_ids"] for p in pairs)
    # with room for the whole completions they are all kept
    assert prepare(tokenizer, data)[2]["identical_skipped"] == 0


# --- Rows the tokenizer must never see ---------------------------------------------------------

SHAREGPT = [{"from": "human", "value": "sort: 3 1 2"}]


def with_row(index, conversational=False, **values):
    data = rows(4, conversational=conversational)
    data[index].update(values)
    return data


BAD_ROWS = [
    # (dataset, error, pattern): the pattern names the row and the column or the keys expected
    (
        with_row(2, True, prompt=SHAREGPT),
        ValueError,
        r"row 2: prompt, message 0.*'role', 'content'",
    ),
    (
        with_row(1, True, chosen=[{"from": "gpt", "value": "1 2 3"}]),
        ValueError,
        r"row 1: chosen.*ShareGPT",
    ),
    (with_row(1, chosen=None), TypeError, r"row 1: chosen must be a string or a list"),
    (with_row(3, rejected=7), TypeError, r"row 3: rejected must be a string"),
    (with_row(0, prompt=None), TypeError, r"row 0: prompt must be"),
    (
        with_row(2, chosen=[{"role": "assistant", "content": "1 2 3"}]),
        ValueError,
        r"row 2 mixes plain and conversational fields \(prompt is a string, chosen is a list",
    ),
    (
        with_row(1, True, rejected=[{"role": "assistant", "content": None}]),
        ValueError,
        r"row 1: rejected, message 0: has \['role'\]; expected a dict with keys",
    ),
    (
        with_row(1, True, rejected=[{"role": "assistant", "content": 5}]),
        TypeError,
        r"row 1: rejected, message 0: role and content must be strings",
    ),
    (with_row(0, prompt=""), ValueError, r"row 0: the prompt tokenises to no token"),
    (with_row(3, chosen="  "), ValueError, r"row 3: the chosen completion is empty"),
    ([*rows(2), {"prompt": "sort: 1 2\n", "chosen": "1 2"}], ValueError, r"row 2 is missing"),
    ([["sort: 1 2\n", "1 2", "2 1"]], TypeError, r"row 0 is a list; expected a dict"),
    ({"prompt": "sort: 2 1\n", "chosen": "1 2", "rejected": "2 1"}, TypeError, "not lists"),
    ({"prompt": ["a", "b"], "chosen": ["1"], "rejected": ["2"]}, ValueError, "different lengths"),
    ("prompt,chosen,rejected", TypeError, "must be a datasets.Dataset, a list of dicts"),
    (42, TypeError, "must be a datasets.Dataset"),
]


@pytest.mark.parametrize(("dataset", "error", "pattern"), BAD_ROWS)
def test_bad_rows_are_refused_naming_the_row(tokenizer, dataset, error, pattern):
    with pytest.raises(error, match=pattern):
        prepare_pairs(tokenizer, dataset, max_length=1024, name="train_dataset")


def test_dict_of_lists_and_dataframe_are_accepted(tokenizer):
    dataset = make_preference_dataset(6, seed=0)
    expected = prepare(tokenizer, dataset)
    assert prepare(tokenizer, dataset.to_dict()) == expected
    assert prepare(tokenizer, pd.DataFrame(dataset.to_list())) == expected
    assert prepare(tokenizer, dataset.to_list()) == expected


def test_empty_data(tokenizer, small_model):
    assert prepare(tokenizer, []) == ([], [], prepare(tokenizer, [])[2])
    chosen, rejected = pair_logps(small_model(), tokenizer, [])
    assert chosen.shape == rejected.shape == (0,)
    data = rows(2)
    for row in data:
        row["rejected"] = row["chosen"]
    with pytest.warns(UserWarning, match="skipped 2"):
        chosen, _ = pair_logps(small_model(), tokenizer, data)
    assert torch.isnan(chosen).all() and chosen.shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_length": "512"}, TypeError, "max_length"),
        ({"max_length": 0}, ValueError, "max_length"),
        ({"max_prompt_length": 2.5}, TypeError, "max_prompt_length"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_pair_logps_arguments(tokenizer, small_model, kwargs, error, name):
    with pytest.raises(error, match=name):
        pair_logps(small_model(), tokenizer, rows(2), **kwargs)


def test_pair_logps_restores_the_mode_after_an_interrupt(tokenizer, small_model):
    model = small_model()

    def interrupt(module, args, kwargs):
        raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        pair_logps(model, tokenizer, rows(2))
    handle.remove()
    assert model.training


# --- Losses: finite inputs, non-finite results -------------------------------------------------


def pair(z, dtype=torch.float32):
    """Log-probs with beta = 1 logit z (policy chosen = z, the rest 0)."""
    z = torch.as_tensor(z, dtype=dtype)
    zeros = torch.zeros_like(z)
    return z, zeros, zeros.clone(), zeros.clone()


def test_log_probs_near_the_float32_limit_are_refused_naming_beta():
    big = torch.tensor([3e38, -3e38])
    with pytest.raises(NonFiniteError, match=r"overflows torch.float32.*beta = 0.1"):
        dpo_loss(big, -big, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        focalpo_loss(big, -big, torch.zeros(2), torch.zeros(2))


def test_beta_too_large_for_the_dtype_is_refused():
    with pytest.raises(ValueError, match=r"beta = 1e\+39"):
        focalpo_loss(*pair([1.0, 0.0]), beta=1e39)
    # float64 has the room: a finite loss, 0 for z = +1e39, 0 * ... for z = 0
    loss = focalpo_loss(*pair([1.0, -1.0], torch.float64), beta=1e39, reduction="none")
    assert torch.isfinite(loss).all() and loss[0] == 0 and loss[1] == 0  # p**gamma underflows


@pytest.mark.parametrize("detach_weight", [False, True])
def test_huge_gamma_has_finite_gradients_or_is_refused(detach_weight):
    with pytest.raises(ValueError, match=r"gamma must be .* <= 3.40"):
        focalpo_loss(*pair([0.5]), gamma=1e39)
    with pytest.raises(ValueError, match="gamma"):
        gradient_weight(torch.zeros(2), gamma=1e39)
    z = torch.tensor([-1e4, -50.0, -1.0, -1e-30, 0.0, 1e-30, 1.0, 50.0, 1e4], requires_grad=True)
    for gamma in (1e30, 3e38):
        loss = focalpo_loss(*pair(z), beta=1.0, gamma=gamma, detach_weight=detach_weight)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        weight = gradient_weight(z.detach(), gamma=gamma, detach_weight=detach_weight)
        assert torch.isfinite(weight).all()


def test_half_precision_reductions_do_not_overflow():
    z = torch.full((200,), -400.0, dtype=torch.float16)
    loss = dpo_loss(*pair(z, torch.float16), beta=1.0, reduction="sum")
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(80_000.0)
    logits = torch.full((2_000_000,), -30.0, dtype=torch.float16)
    total = focal_loss(logits, torch.ones(2_000_000), gamma=0.0, alpha=None, reduction="sum")
    assert total.dtype == torch.float32 and total.item() == pytest.approx(6e7, rel=1e-3)


def meta_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


@pytest.mark.parametrize("index", [1, 3])
def test_mixed_devices_name_the_argument(index):
    logps = list(pair([0.5, -0.5]))
    logps[index] = meta_like(logps[index])
    name = ["policy_rejected_logps", "ref_rejected_logps"][index // 2]
    for fn in (dpo_loss, focalpo_loss):
        with pytest.raises(ValueError, match=f"{name} is on meta"):
            fn(*logps)
    with pytest.raises(ValueError, match="targets is on meta"):
        focal_loss(torch.zeros(3), meta_like(torch.zeros(3)))
    with pytest.raises(ValueError, match="now_correct is on meta"):
        ranking_groups(torch.ones(3, dtype=torch.bool), meta_like(torch.ones(3, dtype=torch.bool)))


def test_reference_log_probs_that_require_grad_warn():
    logps = [t.clone().requires_grad_() for t in pair([0.5, -0.5])]
    with pytest.warns(UserWarning, match="ref_chosen_logps and ref_rejected_logps require"):
        focalpo_loss(*logps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        focalpo_loss(logps[0], logps[1], logps[2].detach(), logps[3].detach())


def test_numpy_scalars_are_accepted():
    logps = pair([0.5, -0.5])
    expected = focalpo_loss(*logps, beta=0.1, gamma=0.5)
    assert torch.equal(focalpo_loss(*logps, beta=np.float32(0.1), gamma=np.float64(0.5)), expected)
    config = TrainConfig(beta=np.float32(0.25), gamma=np.int64(1), batch_size=np.int64(4))
    assert (config.beta, config.gamma, config.batch_size) == (0.25, 1.0, 4)
    assert type(config.beta) is float and type(config.batch_size) is int


# --- sequence_logps: only the completion positions matter --------------------------------------


def logits_case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    return logits, labels, mask


def test_nan_logits_at_padding_positions_are_ignored():
    logits, labels, mask = logits_case()
    expected = sequence_logps(logits, labels, mask)
    dirty = logits.clone()
    dirty[0, 4:] = math.nan  # predicts padding only (position t-1 predicts label t)
    dirty[1, 5] = math.inf
    dirty.requires_grad_()
    got = sequence_logps(dirty, labels, mask)
    assert torch.equal(got, expected)
    (grad,) = torch.autograd.grad(got.sum(), dirty)
    assert torch.isfinite(grad).all() and (grad[0, 4:] == 0).all()
    dirty = logits.clone()
    dirty[1, 2, 3] = math.nan  # predicts a completion token
    with pytest.raises(NonFiniteError, match="logits must be finite at completion positions"):
        sequence_logps(dirty, labels, mask)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_small_integer_labels_give_the_int64_result(dtype):
    logits, labels, mask = logits_case()
    expected = sequence_logps(logits, labels, mask)
    assert torch.equal(sequence_logps(logits, labels.to(dtype), mask), expected)


def test_sequence_logps_mixed_devices_name_the_argument():
    logits, labels, mask = logits_case()
    with pytest.raises(ValueError, match="completion_mask is on meta"):
        sequence_logps(logits, labels, meta_like(mask))


# --- Configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error", "name"),
    [
        ({"gamma": "0.5"}, TypeError, "gamma"),
        ({"beta": "0.1"}, TypeError, "beta"),
        ({"max_length": "1024"}, TypeError, "max_length"),
        ({"batch_size": 4.0}, TypeError, "batch_size"),
        ({"warmup_steps": 20, "max_steps": 10}, ValueError, "warmup_steps must be <= max_steps"),
        ({"checkpoint_dir": 123}, TypeError, "checkpoint_dir"),
        ({"loss": "focal"}, ValueError, "loss must be"),
        ({"beta": 0}, ValueError, "beta"),
    ],
)
def test_train_config_names_the_field(overrides, error, name):
    with pytest.raises(error, match=name):
        TrainConfig(**overrides)


def test_the_dropped_partial_batch_is_documented():
    assert "partial batch" in TrainConfig.__doc__


# --- The rest of the public boundary --------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"n": "5"}, TypeError, "n must be"),
        ({"n": 0}, ValueError, "n must be"),
        ({"noise": "0.1"}, TypeError, "noise"),
        ({"noise": 1.5}, ValueError, "noise"),
        ({"min_len": "3"}, TypeError, "min_len"),
        ({"conversational": "yes"}, TypeError, "conversational"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_make_preference_dataset_names_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        make_preference_dataset(**{"n": 4, **kwargs})


def test_make_preference_dataset_accepts_numpy_integers():
    assert len(make_preference_dataset(np.int64(3))) == 3


def test_true_reward_names_the_argument():
    with pytest.raises(TypeError, match="prompt"):
        true_reward(None, "1 2")
    with pytest.raises(TypeError, match="completion"):
        true_reward("sort: 2 1\n", 12)


def test_sft_validates_rows_and_accepts_dicts_of_lists(tokenizer, small_model):
    data = rows(4)
    data[2]["chosen"] = None
    with pytest.raises(TypeError, match="row 2: chosen must be"):
        supervised_finetune(small_model(), tokenizer, data, steps=1)
    with pytest.raises(ValueError, match="dataset is empty"):
        supervised_finetune(small_model(), tokenizer, [], steps=1)
    columns = make_preference_dataset(4, seed=0).to_dict()
    assert len(supervised_finetune(small_model(), tokenizer, columns, steps=2)) == 2


def test_gradient_share_without_gradient_mass_is_nan():
    z = torch.tensor([-100.0, -200.0])  # p**gamma underflows to 0 for every pair
    assert math.isnan(gradient_share(z, torch.tensor([True, False]), gamma=1e6))


def test_metrics_of_mixed_devices_name_the_argument():
    logps = list(pair([0.5, -0.5]))
    logps[2] = meta_like(logps[2])
    with pytest.raises(ValueError, match="ref_chosen_logps is on meta"):
        preference_metrics(*logps, beta=0.1)


# --- Checkpoint identity of callable losses --------------------------------------------------


def test_callable_losses_are_told_apart_by_name_and_code_never_by_printed_values():
    import functools

    def loss_a(*logps, **kwargs):
        return focalpo_loss(*logps, **kwargs)

    first = lambda *a, **k: focalpo_loss(*a, **k)  # noqa: E731
    second = lambda *a, **k: dpo_loss(*a[:4], beta=k["beta"])  # noqa: E731

    def record(loss):
        return checkpoint.config_record(TrainConfig(loss=loss))["loss"]

    def differ(a, b):
        return checkpoint._loss_difference(record(a), record(b))

    assert differ(first, second) and "code differs" in differ(first, second)
    assert differ(first, first) is None
    assert differ(functools.partial(loss_a, s=1), functools.partial(loss_a, s=2)) is None
    assert "name differs" in differ(functools.partial(focalpo_loss), functools.partial(dpo_loss))
    assert "name differs" in differ(loss_a, first)
    for loss in (first, functools.partial(loss_a, s=1)):  # plain types only
        assert set(map(type, record(loss).values())) <= {str, type(None)}


def test_pair_helpers_name_what_is_wrong(tokenizer):
    from focalpo_mini.pairs import collate, tokenize_pair

    with pytest.raises(ValueError, match="pairs is empty"):
        collate([], 0)
    with pytest.raises(TypeError, match="example: prompt must be a string"):
        tokenize_pair(tokenizer, {"prompt": None, "chosen": "1", "rejected": "2"})


def test_an_integer_beyond_float_range_is_refused_naming_it():
    with pytest.raises(ValueError, match="beta must be a finite number"):
        TrainConfig(beta=10**400)
