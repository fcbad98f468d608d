"""One test per finding of the second robustness pass (issue 21) in the modules this suite owns:
each failed on the code before the fix."""

from __future__ import annotations

import math
import os
import pathlib
import warnings

import numpy as np
import pytest
import torch

from focalpo_mini import checkpoint
from focalpo_mini.baselines import ipo_loss
from focalpo_mini.data import make_preference_dataset, true_reward
from focalpo_mini.generation import answer_quality, greedy_answers, sampled_kl
from focalpo_mini.losses import dpo_loss
from focalpo_mini.pairs import prepare_pairs
from focalpo_mini.tiny import make_model, make_tokenizer
from focalpo_mini.trainer import TrainConfig, TrainResult, train

SMALL = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
)


def small(tokenizer, **overrides):
    return make_model(tokenizer, seed=0, **{**SMALL, **overrides})


def quick(**overrides) -> TrainConfig:
    return TrainConfig(**{"batch_size": 4, "max_steps": 2, "progress": False, **overrides})


# --- 1. A checkpoint that can never be read back ---


@pytest.mark.parametrize("field", ["path", "numpy loss"])
def test_a_path_or_numpy_config_checkpoint_resumes(tokenizer, tmp_path, field):
    data = make_preference_dataset(8, seed=0)
    extra = {"loss": np.str_("dpo")} if field == "numpy loss" else {}
    config = quick(checkpoint_dir=pathlib.Path(tmp_path), checkpoint_every=1, **extra)
    train(small(tokenizer), tokenizer, data, config=config)
    result = train(small(tokenizer), tokenizer, data, config=config, resume_from=tmp_path)
    assert result.history[-1]["step"] == 2
    assert type(config.checkpoint_dir) is str and type(config.loss) is str


# --- 2. Resumes ---


def test_resume_from_the_periodic_checkpoint_after_a_drawing_on_eval_is_exact(tokenizer, tmp_path):
    data, held_out = make_preference_dataset(12, seed=0), make_preference_dataset(4, seed=1)
    settings = dict(max_steps=4, eval_every=2, log_every=1, learning_rate=1e-2)

    def on_eval(step, model):
        torch.rand(5)  # e.g. sampled generation: it moves the global RNG

    def crash_at_four(step, model):
        on_eval(step, model)
        if step == 4:
            raise RuntimeError("a crash: the checkpoint of step 2 is what remains")

    full = small(tokenizer, attention_dropout=0.3)
    train(full, tokenizer, data, held_out, config=quick(**settings), on_eval=on_eval)
    config = quick(**settings, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(RuntimeError, match="a crash"):
        train(
            small(tokenizer, attention_dropout=0.3),
            tokenizer,
            data,
            held_out,
            config=config,
            on_eval=crash_at_four,
        )
    resumed = small(tokenizer, attention_dropout=0.3)
    train(resumed, tokenizer, data, held_out, config=config, on_eval=on_eval, resume_from=tmp_path)
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"rms_norm_eps": 0.5}, "rms_norm_eps"),
        ("bf16", "bfloat16"),
    ],
)
def test_a_resume_into_another_model_is_refused(tokenizer, tmp_path, change, named):
    data = make_preference_dataset(8, seed=0)
    config = quick(checkpoint_dir=str(tmp_path), checkpoint_every=1)
    train(small(tokenizer), tokenizer, data, config=config)
    other = small(tokenizer).to(torch.bfloat16) if change == "bf16" else small(tokenizer, **change)
    with pytest.raises(ValueError, match=named):
        train(other, tokenizer, data, config=config, resume_from=tmp_path)


def test_callable_losses_are_never_compared_through_printed_text(tokenizer, tmp_path):
    data = make_preference_dataset(8, seed=0)
    half = torch.tensor(0.5)

    def config_with(loss):
        return quick(loss=loss, checkpoint_dir=str(tmp_path), checkpoint_every=1)

    train(
        small(tokenizer),
        tokenizer,
        data,
        config=config_with(lambda *a, **k: half * dpo_loss(*a[:4], beta=k["beta"])),
    )
    other = torch.tensor(0.50001)  # prints as tensor(0.5000)
    with pytest.warns(UserWarning, match="cannot be compared"):
        train(
            small(tokenizer),
            tokenizer,
            data,
            config=config_with(lambda *a, **k: other * dpo_loss(*a[:4], beta=k["beta"])),
            resume_from=tmp_path,
        )


def test_a_resume_with_another_tokenizer_names_the_tokenizer(tokenizer, tmp_path):
    data = make_preference_dataset(8, seed=0)
    config = quick(checkpoint_dir=str(tmp_path), checkpoint_every=1)
    train(small(tokenizer), tokenizer, data, config=config)
    with pytest.raises(ValueError, match="different tokenizer"):
        train(small(tokenizer), make_tokenizer(270), data, config=config, resume_from=tmp_path)


# --- 4. The judge ---


@pytest.mark.parametrize("answer", ["١ ٢ ٣", "１ ２ ３", "1 ²", "1 2 ³"])
def test_only_ascii_digits_are_digits(answer):
    assert true_reward("sort: 3 1 2\n", answer) == -1.0
    assert answer_quality(["sort: 3 1 2\n"], [answer])["invalid"] == 1.0


# --- 5. Exercise checkers ---


def _constant_beta(value):
    from focalpo_mini.exercises import part1

    def answer(policy, ref, beta):
        return value * (policy - ref)

    return part1.check_implicit_reward, answer


def test_a_hard_coded_parameter_fails_the_checkers():
    from focalpo_mini.exercises import check_balanced_cross_entropy, check_idealized_ranking
    from focalpo_mini.exercises.part1 import _balanced_ce

    checker, answer = _constant_beta(0.1)
    with pytest.raises(AssertionError):
        checker(answer)
    with pytest.raises(AssertionError):
        check_balanced_cross_entropy(lambda x, y, a: _balanced_ce(x, y, 0.25))

    def ideal_beta_half(rc, rr, rho, beta):
        return rc - rr + (torch.log(rho) - torch.log1p(-rho)) / 0.5 > 0

    with pytest.raises(AssertionError):
        check_idealized_ranking(ideal_beta_half)


def test_checkers_refuse_complex_answers_and_stop_endless_functions(monkeypatch):
    from focalpo_mini.exercises import _check, check_dpo_weight

    with pytest.raises(AssertionError, match="complex"):
        check_dpo_weight(lambda z: torch.sigmoid(-z).to(torch.complex128))
    monkeypatch.setattr(_check, "TIME_LIMIT_S", 0.2)

    def endless(z):
        while True:
            pass

    with pytest.raises(AssertionError, match="did not return within"):
        check_dpo_weight(endless)


def test_the_duplicate_index_bug_is_named():
    from focalpo_mini.exercises import check_bt_gradient

    def indexed(r, w, v):
        weight = (1 - torch.sigmoid(r[w] - r[v])) / len(w)
        g = torch.zeros_like(r)
        g[w] -= weight
        g[v] += weight
        return g

    with pytest.raises(AssertionError, match="index_add_"):
        check_bt_gradient(indexed)


def test_chapter_4_checkers_are_exported_like_the_others():
    import focalpo_mini.exercises as exercises

    for name in ("check_accuracies", "check_ranking_threshold", "check_idealized_ranking"):
        assert name in exercises.__all__ and callable(getattr(exercises, name))


# --- 6. Generation helpers ---


def test_generation_refuses_a_string_and_bad_batch_sizes_and_restores_modes(tokenizer):
    model, reference = small(tokenizer), small(tokenizer)
    with pytest.raises(TypeError, match="prompts must be a list"):
        greedy_answers(model, tokenizer, "sort: 3 1 2")
    with pytest.raises(TypeError, match="answers must be a list"):
        answer_quality(["sort: 1 2\n"], "12")
    with pytest.raises(ValueError, match="batch_size"):
        sampled_kl(model, reference, tokenizer, ["sort: 1 2\n"], batch_size=-1)
    model.train()
    reference.train()
    sampled_kl(model, reference, tokenizer, ["sort: 1 2\n"], max_new_tokens=2)
    assert model.training and reference.training

    def broken(*args, **kwargs):
        raise RuntimeError("generation failed")

    model.generate = broken
    with pytest.raises(RuntimeError):
        greedy_answers(model, tokenizer, ["sort: 1 2\n"])
    assert model.training


# --- 7. Configs checked on assignment ---


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("grad_accum_steps", 0),
        ("loss", "dpoo"),
        ("max_steps", 0),
        ("warmup_steps", 10**6),
        ("learning_rate", 1e39),
    ],
)
def test_every_assignment_is_checked(field, value):
    config = TrainConfig()
    with pytest.raises((TypeError, ValueError), match=field):
        setattr(config, field, value)
    assert config == TrainConfig()


def test_focalpo_config_refuses_a_loss_type_it_ignores(tmp_path):
    pytest.importorskip("trl")
    from focalpo_mini.trl import FocalPOConfig

    args = FocalPOConfig(str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="loss_type"):
        args.loss_type = ["hinge"]
    assert args.loss_type == ["sigmoid"]


# --- 8. Losses and shares ---


def test_ipo_loss_refuses_nan_and_overflow_with_a_named_error():
    t = torch.tensor
    zero = t([0.0, 0.0])
    with pytest.raises(ValueError, match="chosen_lengths"):
        ipo_loss(
            t([-1.0, -2.0]),
            zero,
            zero,
            zero,
            chosen_lengths=t([math.nan, 1.0]),
            rejected_lengths=t([1, 1]),
        )
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(
            t([-3e38, -1.0]),
            t([3e38, -1.0]),
            zero,
            zero,
            chosen_lengths=t([1, 1]),
            rejected_lengths=t([1, 1]),
        )


def test_a_nan_weight_share_names_the_nan():
    from focalpo_mini.viz import weight_share

    with pytest.raises(ValueError, match="finite"):
        weight_share(torch.tensor([math.nan, 1.0]), torch.tensor([True, False]))


# --- 9. Security ---


def test_a_planted_symlink_is_never_written_through(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    os.symlink(target, tmp_path / "checkpoint.pt.tmp")
    state = {key: {} for key in checkpoint.STATE_KEYS}
    path = checkpoint.save(state, tmp_path)
    assert target.read_bytes() == b"keep me"
    assert not os.path.islink(path) and checkpoint.read(path).keys() == state.keys()


# --- Cryptic errors ---


def test_the_cryptic_errors_now_name_the_argument(tokenizer):
    data = make_preference_dataset(4, seed=0)
    with pytest.raises(ValueError, match=r"model .* has no parameters"):
        train(torch.nn.Module(), tokenizer, data, config=quick())
    with pytest.raises(ValueError, match="input embedding has only"):
        narrow = small(tokenizer)
        narrow.resize_token_embeddings(20)  # a model built for a smaller vocabulary
        train(narrow, tokenizer, data, config=quick())
    no_eos = make_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="eos_token"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_pairs(no_eos, data, max_length=64)
    with pytest.raises(TypeError, match="tokenizer"):
        prepare_pairs(None, data, max_length=64)
    rows = make_preference_dataset(2, conversational=True).to_list()
    rows[1]["prompt"] = []
    with pytest.raises(ValueError, match="row 1: prompt is an empty list"):
        prepare_pairs(tokenizer, rows, max_length=64)
    with pytest.raises(TypeError, match="vocab_size"):
        make_tokenizer("512")
    with pytest.raises(TypeError, match="tokenizer"):
        make_model(None)
    with pytest.raises(TypeError, match="dense"):
        dpo_loss(*(torch.tensor([0.0, -1.0]).to_sparse(),) * 4)


def test_statistics_and_plots_name_their_arguments():
    from focalpo_mini.stats import paired_comparison
    from focalpo_mini.viz import new_figure, plot_training

    a, b = [0.1, 0.2, 0.3], [0.0, 0.1, 0.5]
    with pytest.raises(ValueError, match="a must be finite"):
        paired_comparison([math.nan, 0.2, 0.3], b)
    with pytest.raises(ValueError, match="one-dimensional"):
        paired_comparison([a, a], [b, b])
    for bad in ({"resamples": 0}, {"resamples": -5}, {"seed": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            paired_comparison(a, b, **bad)
    assert paired_comparison(a, b, resamples=np.int64(200), seed=np.int64(1))["n"] == 3
    with pytest.raises(TypeError, match="width"):
        new_figure(width="6")
    with pytest.raises(TypeError, match="metrics"):
        plot_training({"x": TrainResult([], [], [], TrainConfig(), {})}, metrics="loss")
