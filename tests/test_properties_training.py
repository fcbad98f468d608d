"""Property tests of training: configs that are checked on every assignment and round-trip
through checkpoints as plain types, resumes that repeat the uninterrupted run bit for bit (from a
random step, with and without dropout, whatever ``on_eval`` draws), resumes that refuse another
model, dtype or tokenizer, and the contract of ``train`` and the pair helpers it uses."""

from __future__ import annotations

import copy
import io
import pathlib
import signal
import warnings

import numpy as np
import pytest
import torch
from _contract import ANYTHING, RAISED, assert_finite, call
from hypothesis import given, settings
from hypothesis import strategies as st

from focalpo_mini import checkpoint, pairs
from focalpo_mini.data import make_preference_dataset
from focalpo_mini.tiny import make_model
from focalpo_mini.trainer import LOSS_NAMES, TrainConfig, TrainResult, preference_loss, train

FIELD_VALUES = {
    "beta": st.one_of(st.floats(1e-3, 10.0), st.sampled_from([np.float32(0.2), np.float64(1)])),
    "loss": st.sampled_from([*LOSS_NAMES, np.str_("dpo")]),
    "gamma": st.one_of(st.floats(0.0, 5.0), st.just(np.float16(0.5)), st.just(2)),
    "detach_weight": st.sampled_from([True, False, np.bool_(True)]),
    "label_smoothing": st.floats(0.0, 0.5),
    "learning_rate": st.one_of(st.floats(1e-8, 1.0), st.just(np.float32(1e-3))),
    "batch_size": st.one_of(st.integers(1, 64), st.just(np.int64(8))),
    "grad_accum_steps": st.integers(1, 8),
    "max_steps": st.integers(64, 10**6),
    "warmup_steps": st.integers(0, 64),
    "max_grad_norm": st.one_of(st.none(), st.floats(1e-3, 100.0)),
    "weight_decay": st.floats(0.0, 1.0),
    "max_length": st.integers(2, 4096),
    "eval_every": st.integers(0, 100),
    "log_every": st.one_of(st.integers(1, 100), st.just(np.uint16(5))),
    "seed": st.one_of(st.integers(0, 2**32 - 1), st.just(np.int32(7))),
    "checkpoint_dir": st.one_of(
        st.just(pathlib.Path("runs") / "a"),
        st.text(min_size=1, max_size=8).filter(lambda t: "\0" not in t),
    ),
    "checkpoint_every": st.integers(0, 10),
    "record_eval_pairs": st.booleans(),
    "progress": st.booleans(),
}
PLAIN = (str, int, float, bool, type(None))


def _plain_record(record: dict) -> None:
    for name, value in record.items():
        assert type(value) in PLAIN, f"{name} is stored as {type(value).__name__}"


@settings(max_examples=80)
@given(st.fixed_dictionaries(FIELD_VALUES))
def test_every_train_config_round_trips_through_a_checkpoint(tmp_path_factory, values):
    config = TrainConfig(**values)
    record = checkpoint.config_record(config)
    _plain_record(record)
    state = {key: {} for key in checkpoint.STATE_KEYS} | {"config": record}
    folder = tmp_path_factory.mktemp("config")
    checkpoint.save(state, folder)
    saved = checkpoint.read(folder)["config"]  # weights_only=True reads it back
    assert saved == record
    assert TrainConfig(**saved) == config


@settings(max_examples=150)
@given(field=st.sampled_from(sorted(FIELD_VALUES)), value=ANYTHING)
def test_every_assignment_is_checked_and_a_refused_one_changes_nothing(field, value):
    config = TrainConfig(checkpoint_dir="runs")
    before = dict(vars(config))
    try:
        setattr(config, field, value)
    except (TypeError, ValueError) as error:
        assert field in str(error)
        assert vars(config) == before
        return
    _plain_record({k: v for k, v in vars(config).items() if k != "loss" or isinstance(v, str)})
    assert TrainConfig(**vars(config)) == config  # still a config its checks accept


@pytest.fixture(scope="module")
def focal_config():
    pytest.importorskip("trl")
    from focalpo_mini.trl import FocalPOConfig

    return FocalPOConfig


@settings(max_examples=25)
@given(
    gamma=st.one_of(st.floats(0.0, 5.0), st.just(np.float32(1.0))),
    beta=st.floats(1e-3, 5.0),
    detach=st.sampled_from([True, False, np.bool_(False)]),
    max_length=st.one_of(st.none(), st.integers(1, 4096)),
    field=st.sampled_from(["gamma", "beta", "detach_weight", "max_length", "loss_type"]),
    value=st.one_of(ANYTHING, st.sampled_from(["sigmoid", ["hinge"], ["sigmoid"], "ipo"])),
)
def test_focalpo_config_round_trips_and_checks_every_assignment(
    focal_config, tmp_path_factory, gamma, beta, detach, max_length, field, value
):
    args = focal_config(
        str(tmp_path_factory.mktemp("focal")),
        gamma=gamma,
        beta=beta,
        detach_weight=detach,
        max_length=max_length,
        use_cpu=True,
        report_to=[],
    )
    mine = {k: getattr(args, k) for k in ("gamma", "beta", "detach_weight", "max_length")}
    assert all(type(v) in PLAIN for v in mine.values())
    buffer = io.BytesIO()
    torch.save(args, buffer)  # what the Trainer writes as training_args.bin in a checkpoint
    again = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert {k: getattr(again, k) for k in mine} == mine and again.loss_type == ["sigmoid"]
    before = {k: getattr(args, k) for k in (*mine, "loss_type")}
    try:
        setattr(args, field, value)
    except (TypeError, ValueError) as error:
        assert field in str(error)
        assert {k: getattr(args, k) for k in before} == before
        return
    assert args.loss_type == ["sigmoid"] and args.gamma >= 0 and args.beta > 0


# --- Resumes ----------------------------------------------------------------------------------

SMALL = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
)


def small(tokenizer, **overrides):
    return make_model(tokenizer, seed=0, **{**SMALL, **overrides})


def run_config(**overrides) -> TrainConfig:
    settings_ = dict(batch_size=4, max_steps=5, log_every=1, learning_rate=1e-2, progress=False)
    return TrainConfig(**{**settings_, "seed": 3, **overrides})


@settings(max_examples=10)
@given(
    stop=st.integers(1, 4),
    dropout=st.sampled_from([0.0, 0.3]),
    how=st.sampled_from(["raise", "signal", "crash"]),
    eval_every=st.sampled_from([1, 2]),
)
def test_a_resume_from_any_step_is_the_uninterrupted_run(
    tokenizer, tmp_path_factory, stop, dropout, how, eval_every
):
    """Dropout and an on_eval that draws random numbers (as sampled generation does) both use the
    global RNG; the interruption is a KeyboardInterrupt raised in on_eval, a real SIGINT (taken at
    the end of the step), or a crash after which the last periodic checkpoint is resumed."""
    if how == "crash":  # the first periodic checkpoint is written after step 1
        stop = max(stop, 2)
    data, held_out = make_preference_dataset(12, seed=0), make_preference_dataset(4, seed=1)
    draws: dict[int, torch.Tensor] = {}

    def on_eval(step, model):
        draws[step] = torch.rand(3)

    def train_with(model, on_eval_, **overrides):
        return train(
            model,
            tokenizer,
            data,
            held_out,
            config=run_config(eval_every=eval_every, **overrides),
            on_eval=on_eval_,
        )

    full_model = small(tokenizer, attention_dropout=dropout)
    full = train_with(full_model, on_eval)
    expected_draws, fired = dict(draws), []

    def interrupting(step, model):
        on_eval(step, model)
        if step >= stop and not fired:
            fired.append(step)
            if how == "raise":
                raise KeyboardInterrupt
            if how == "signal":
                signal.raise_signal(signal.SIGINT)  # deferred to the end of the step
            else:
                raise RuntimeError("a crash: no checkpoint is written")

    folder = str(tmp_path_factory.mktemp("resume"))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt if how != "crash" else RuntimeError):
            train_with(
                small(tokenizer, attention_dropout=dropout),
                interrupting,
                checkpoint_dir=folder,
                checkpoint_every=1 if how == "crash" else 0,
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    resumed_model = small(tokenizer, attention_dropout=dropout)
    resumed = train(
        resumed_model,
        tokenizer,
        data,
        held_out,
        config=run_config(eval_every=eval_every, checkpoint_dir=folder),
        on_eval=on_eval,
        resume_from=folder,
    )
    for p, q in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert _same_rows(resumed.history, full.history)
    assert _same_rows(resumed.eval_history, full.eval_history)
    assert draws.keys() == expected_draws.keys()
    assert all(torch.equal(draws[s], expected_draws[s]) for s in draws)


def _same_rows(rows: list[dict], expected: list[dict]) -> bool:
    """Equal log rows, NaN (an empty group's metric) equal to NaN."""

    def same(a, b) -> bool:
        return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)

    return len(rows) == len(expected) and all(
        r.keys() == e.keys() and all(same(r[k], e[k]) for k in r)
        for r, e in zip(rows, expected, strict=True)
    )


@pytest.fixture(scope="module")
def finished_run(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    data = make_preference_dataset(8, seed=0)
    config = run_config(max_steps=2, checkpoint_dir=folder, checkpoint_every=1)
    train(small(tokenizer), tokenizer, data, config=config)
    return folder, data, config


CHANGES = {
    "activation": (lambda tok: small(tok, hidden_act="relu"), "config"),
    "norm eps": (lambda tok: small(tok, rms_norm_eps=0.5), "rms_norm_eps"),
    "dropout": (lambda tok: small(tok, attention_dropout=0.5), "attention_dropout"),
    "bfloat16": (lambda tok: small(tok).to(torch.bfloat16), "bfloat16"),
    "width": (lambda tok: small(tok, intermediate_size=48), "intermediate_size"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_resume_refuses_another_model_naming_the_difference(tokenizer, finished_run, change):
    folder, data, config = finished_run
    build, named = CHANGES[change]
    with pytest.raises(ValueError, match=named):
        train(build(tokenizer), tokenizer, data, config=config, resume_from=folder)


def test_a_resume_refuses_another_tokenizer_naming_it(tokenizer, finished_run):
    folder, data, config = finished_run
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ messages[0]['content'] }}"  # plain-text ids unchanged
    with pytest.raises(ValueError, match="different tokenizer"):
        train(small(tokenizer), other, data, config=config, resume_from=folder)


def test_run_identity_and_rng_state_are_plain_and_tell_runs_apart(tokenizer):
    first = checkpoint.run_identity(small(tokenizer), tokenizer)
    again = checkpoint.run_identity(small(tokenizer), tokenizer)
    assert first == again and checkpoint._plain(first) == first
    assert checkpoint.run_identity(small(tokenizer, hidden_act="relu"), tokenizer) != first
    other = copy.deepcopy(tokenizer)
    assert checkpoint.tokenizer_fingerprint(other) == checkpoint.tokenizer_fingerprint(tokenizer)
    other.eos_token = "<|pad|>"
    assert checkpoint.tokenizer_fingerprint(other) != checkpoint.tokenizer_fingerprint(tokenizer)
    state = checkpoint.rng_state()
    drawn = torch.rand(4)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(4), drawn)


# --- train, preference_loss and the pair helpers under the contract ----------------------------


@settings(max_examples=30)
@given(st.data())
def test_train_names_the_argument_it_refuses(tokenizer, tmp_path_factory, data_):
    args = {
        "model": small(tokenizer),
        "tokenizer": tokenizer,
        "train_dataset": make_preference_dataset(4, seed=0),
        "eval_dataset": None,
        "config": run_config(max_steps=1),
        "ref_model": None,
        "resume_from": None,
        "on_eval": None,
    }
    replaced = data_.draw(st.sampled_from(sorted(args)))
    args[replaced] = data_.draw(ANYTHING)
    names = [replaced, "batch_size"] if replaced == "config" else [replaced]
    if replaced == "resume_from" and isinstance(args[replaced], (str, bytes)):
        args[replaced] = str(tmp_path_factory.mktemp("none") / "absent")
        with pytest.raises(FileNotFoundError):
            train(**args)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = call(train, names, **args)
    if result is not RAISED:
        assert_finite([row["loss"] for row in result.history])


@settings(max_examples=30)
@given(st.data())
def test_pair_helpers_under_a_model_keep_the_contract(tokenizer, data_):
    model = small(tokenizer)
    dataset = make_preference_dataset(3, seed=0)
    kept, _, _ = pairs.prepare_pairs(tokenizer, dataset, max_length=64)
    batch = pairs.collate(kept, 0)
    kind = data_.draw(
        st.sampled_from(
            [
                "pair_logps",
                "all",
                "batch",
                "device",
                "completion",
                "example",
                "rows",
                "loss",
                "series",
            ]
        )
    )
    garbage = data_.draw(ANYTHING)
    if kind == "pair_logps":
        name = data_.draw(st.sampled_from(["model", "dataset", "batch_size", "max_length"]))
        args = {
            "model": model,
            "tokenizer": tokenizer,
            "dataset": dataset,
            "batch_size": 2,
            "max_length": 64,
        }
        args[name] = garbage
        result = call(pairs.pair_logps, [name], **args)
        if result is not RAISED:
            assert result[0].shape == (len(args["dataset"]),)
    elif kind == "all":
        name = data_.draw(st.sampled_from(["model", "pairs", "batch_size", "pad_id"]))
        args = {"model": model, "pairs": kept, "batch_size": 2, "pad_id": 0}
        args[name] = garbage
        result = call(pairs.all_pair_logps, [name], **args)
        assert result is RAISED or len(result[0]) == len(args["pairs"])
    elif kind == "batch":
        name = data_.draw(st.sampled_from(["model", "batch"]))
        args = {"model": model, "batch": batch}
        result = call(pairs.batch_logps, [name], **{**args, name: garbage})
        assert result is RAISED or torch.isfinite(torch.stack(result)).all()
    elif kind == "device":
        name = data_.draw(st.sampled_from(["batch", "device"]))
        call(pairs.to_device, [name], **{"batch": batch, "device": "cpu", name: garbage})
    elif kind == "completion":
        call(pairs.tokenize_completion, ["prompt", "completion"], tokenizer, garbage, "1 2")
    elif kind == "example":
        call(pairs.check_example, ["row 0"], garbage, "row 0")
    elif kind == "rows":
        call(pairs.collate_completions, ["rows", "pad_token_id"], garbage, 0)
    elif kind == "loss":
        ref = torch.zeros(len(kept))
        name = data_.draw(st.sampled_from(["model", "batch", "config"]))
        args = {"model": model, "batch": batch, "config": run_config()}
        args[name] = garbage
        result = call(
            preference_loss, [name], args["model"], args["batch"], ref, ref, config=args["config"]
        )
        assert result is RAISED or torch.isfinite(result[0])
    else:
        result = TrainResult([{"step": 1, "loss": 0.5}], [], [], run_config(), {})
        try:
            call(result.series, ["split"], "loss", split=garbage)
        except KeyError as error:  # an unknown metric is a KeyError, like a dict's
            assert "loss" in str(error) or "metric" in str(error)


@settings(max_examples=20)
@given(args=ANYTHING.filter(lambda value: value is not None))
def test_focalpo_trainer_names_args_it_refuses(tokenizer, focal_config, args):
    from focalpo_mini.trl import FocalPOTrainer

    dataset = make_preference_dataset(4, seed=0)
    call(FocalPOTrainer, ["args"], small(tokenizer), args=args, train_dataset=dataset)
