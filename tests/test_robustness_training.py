"""Training never trains on garbage and never loses its last good state: non-finite steps are
skipped and counted, damaged checkpoints are refused, and bad arguments to train() and
FocalPOTrainer get clear errors before any work is done."""

import copy
import functools
import math
import os
import random

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig

from focalpo_mini import checkpoint
from focalpo_mini._checks import NonFiniteError
from focalpo_mini.data import make_preference_dataset
from focalpo_mini.losses import focalpo_loss
from focalpo_mini.tiny import make_model
from focalpo_mini.trainer import TrainConfig, train
from focalpo_mini.trl import FocalPOConfig, FocalPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    base = {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 3, "log_every": 1}
    return TrainConfig(**{**base, "progress": False, **overrides})


class NanAt:
    """FocalPO, except that call ``call`` returns NaN (what an overflow gives)."""

    def __init__(self, call=None):
        self.call, self.calls = call, 0

    def __call__(self, *logps, **kwargs):
        self.calls += 1
        loss = focalpo_loss(*logps, **kwargs)
        return loss * torch.nan if self.calls == self.call else loss


def adam_steps(model_optimizer_state) -> int:
    return int(next(iter(model_optimizer_state["state"].values()))["step"])


# --- Non-finite steps --------------------------------------------------------------------------


def test_a_nan_loss_skips_the_step_and_keeps_the_weights(tokenizer, small_model, tmp_path):
    model = small_model()
    initial = copy.deepcopy(model.state_dict())
    dataset = make_preference_dataset(16, seed=0)
    cfg = config(max_steps=1, loss=NanAt(1), checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.warns(UserWarning, match=r"step 1: the loss is not finite .*skipped"):
        result = train(model, tokenizer, dataset, config=cfg)
    for name, value in model.state_dict().items():  # no update at all
        assert torch.equal(value, initial[name]), name
    (row,) = result.history
    assert row["skipped_steps"] == 1 and row["num_tokens"] == 0 and "loss" not in row
    state = checkpoint.read(tmp_path)
    assert state["optimizer"]["state"] == {}  # AdamW never stepped
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_gradients_and_logits_are_skipped_and_counted(tokenizer, small_model, tmp_path):
    dataset = make_preference_dataset(16, seed=0)
    model = small_model()
    calls = {"forward": 0}

    def nan_logits_in_step_2(module, args, output):  # 4 reference batches, then 1 per step
        calls["forward"] += 1
        if calls["forward"] == 4 + 2:
            output.logits = output.logits * torch.nan
        return output

    model.register_forward_hook(nan_logits_in_step_2)
    weight = model.model.embed_tokens.weight
    weight.register_hook(lambda grad: grad * torch.inf if calls["forward"] == 4 + 4 else grad)
    cfg = config(max_steps=5, max_grad_norm=None, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.warns(UserWarning) as caught:
        result = train(model, tokenizer, dataset, config=cfg)
    skips = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skips) == 2
    assert skips[0].startswith("step 2: logits must be finite at completion positions")
    assert skips[1].startswith("step 4: the gradient norm is nan")
    assert [r["skipped_steps"] for r in result.history] == [0, 1, 1, 2, 2]
    assert {"loss", "rewards/margins"}.isdisjoint(result.history[1])
    state = checkpoint.read(tmp_path)
    assert adam_steps(state["optimizer"]) == 3  # five steps, two skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # max_grad_norm=None logs the unclipped norm (it logged nan before)
    norms = [r["grad_norm"] for r in result.history]
    assert all(norm > 0 for i, norm in enumerate(norms) if i not in (1, 3))
    assert math.isnan(norms[1]) and math.isnan(norms[3])  # no backward pass; a NaN gradient


def test_unclipped_grad_norm_is_the_norm_clipping_sees(tokenizer, small_model):
    dataset = make_preference_dataset(8, seed=0)
    clipped = train(small_model(), tokenizer, dataset, config=config(max_steps=1)).history
    unclipped = train(
        small_model(), tokenizer, dataset, config=config(max_steps=1, max_grad_norm=None)
    ).history
    assert unclipped[0]["grad_norm"] == pytest.approx(clipped[0]["grad_norm"], rel=1e-6)


def test_a_broken_state_never_overwrites_the_last_checkpoint(tokenizer, small_model, tmp_path):
    model = small_model()
    train(
        model,
        tokenizer,
        make_preference_dataset(8, seed=0),
        config=config(max_steps=1, checkpoint_dir=str(tmp_path), checkpoint_every=1),
    )
    good = (tmp_path / "checkpoint.pt").read_bytes()
    state = checkpoint.read(tmp_path)
    state["model"]["lm_head.weight"][0, 0] = torch.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(lm_head.weight\); the last checkpoint"):
        checkpoint.save(state, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_callable_loss_returning_per_pair_values_is_refused(tokenizer, small_model):
    def per_pair(*logps, **kwargs):
        return focalpo_loss(*logps, **{**kwargs, "reduction": "none"})

    with pytest.raises(TypeError, match=r"config.loss\) must return a scalar.*\(4,\)"):
        train(small_model(), tokenizer, make_preference_dataset(8), config=config(loss=per_pair))


@pytest.mark.parametrize(
    "eval_rows",
    [
        [],
        [{"prompt": "sort: 2 1\n", "chosen": "1 2", "rejected": "1 2"}] * 3,
        [{"prompt": "sort: " + "9 8 7 6 5 4 3 2 1 0 " * 8 + "\n", "chosen": "0", "rejected": "1"}],
    ],
    ids=["empty", "all identical", "all prompts too long"],
)
def test_an_eval_split_without_usable_pairs_is_refused_before_any_work(
    tokenizer, small_model, eval_rows
):
    class Untouchable(torch.nn.Module):  # the reference pass must not have started
        def parameters(self):
            raise AssertionError("the reference was used")

    with pytest.warns(UserWarning) if eval_rows else open(os.devnull) as _:
        with pytest.raises(ValueError, match="eval_dataset has no usable pair"):
            train(
                small_model(),
                tokenizer,
                make_preference_dataset(8),
                eval_rows,
                config=config(max_length=40),
                ref_model=Untouchable(),
            )


# --- Checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A checkpoint after two steps, and the config and data to resume it."""
    directory = tmp_path_factory.mktemp("saved")
    model = make_model(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    dataset = make_preference_dataset(8, seed=0)
    cfg = config(max_steps=2, checkpoint_dir=str(directory), checkpoint_every=2)
    train(model, tokenizer, dataset, config=cfg)
    return directory / "checkpoint.pt", dataset, model


def test_every_single_bit_flip_is_refused(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    rng = random.Random(0)
    # 40 random positions plus the header, the checksum and the last byte
    positions = [rng.randrange(len(data)) for _ in range(40)] + [0, 30, 40, len(data) - 1]
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        (tmp_path / "checkpoint.pt").write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match=r"damaged|not a focalpo_mini checkpoint"):
            checkpoint.read(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # a torn write
    with pytest.raises(ValueError, match="damaged"):
        checkpoint.read(tmp_path)


def test_empty_and_foreign_files_get_clear_errors(saved, tmp_path, tokenizer, small_model):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        checkpoint.read(tmp_path / "empty.pt")
    _, dataset, model = saved
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"not a focalpo_mini checkpoint.*load_state_dict"):
        train(
            small_model(), tokenizer, dataset, config=config(), resume_from=tmp_path / "weights.pt"
        )
    with pytest.raises(TypeError, match=r"resume_from must be the path.*state_dict"):
        train(small_model(), tokenizer, dataset, config=config(), resume_from=model.state_dict())


def test_checkpoint_is_flushed_to_disk_before_the_rename(saved, tmp_path, monkeypatch):
    state = checkpoint.read(saved[0])
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    checkpoint.save(state, tmp_path)
    assert calls[:2] == ["fsync", "replace"]
    assert checkpoint.read(tmp_path).keys() == state.keys()


def test_resume_with_another_callable_loss_is_refused_or_warned(tokenizer, small_model, tmp_path):
    """A callable's identity cannot be established: another name or code is refused, the same
    name and code (whatever the partial's arguments) resumes with a warning."""
    dataset = make_preference_dataset(8, seed=0)

    def scaled(*logps, scale, **kwargs):
        return scale * focalpo_loss(*logps, **kwargs)

    first = config(loss=functools.partial(scaled, scale=1.0), checkpoint_dir=str(tmp_path))
    train(
        small_model(), tokenizer, dataset, config=config(**{**vars(first), "checkpoint_every": 3})
    )
    again = config(**{**vars(first), "max_steps": 3})
    with pytest.warns(UserWarning, match="cannot be compared"):
        result = train(small_model(), tokenizer, dataset, config=again, resume_from=tmp_path)
    assert len(result.history)
    other = config(**{**vars(first), "loss": functools.partial(scaled, scale=2.0)})
    with pytest.warns(UserWarning, match=r"callable loss \(functools.partial\(.*scaled\)\)"):
        train(small_model(), tokenizer, dataset, config=other, resume_from=tmp_path)
    lam = config(**{**vars(first), "loss": lambda *a, **k: focalpo_loss(*a, **k)})
    with pytest.raises(ValueError, match=r"different config: loss .*its name differs"):
        train(small_model(), tokenizer, dataset, config=lam, resume_from=tmp_path)
    named = config(**{**vars(first), "loss": "focalpo"})
    with pytest.raises(ValueError, match=r"loss \(checkpoint callable .*, now 'focalpo'\)"):
        train(small_model(), tokenizer, dataset, config=named, resume_from=tmp_path)


# --- FocalPOTrainer -----------------------------------------------------------------------------


def focal_args(tmp_path, **overrides):
    settings = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": []}
    return FocalPOConfig(**{**settings, **overrides})


def test_focalpo_trainer_refuses_a_dpo_config_at_construction(tokenizer, tmp_path):
    args = DPOConfig(str(tmp_path), use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(TypeError, match=r"args must be a FocalPOConfig.*got DPOConfig"):
        FocalPOTrainer(
            model=make_model(tokenizer),
            args=args,
            train_dataset=make_preference_dataset(4),
            processing_class=tokenizer,
        )


def test_focalpo_trainer_without_args_builds_a_focalpo_config(tokenizer, tmp_path, monkeypatch):
    """Like DPOTrainer(args=None): a default config named after the model; on a machine without
    bf16 that default is refused by transformers itself, with its own clear message."""
    monkeypatch.chdir(tmp_path)
    try:
        trainer = FocalPOTrainer(
            model=make_model(tokenizer),
            ref_model=make_model(tokenizer, seed=1),
            train_dataset=make_preference_dataset(4),
            processing_class=tokenizer,
        )
    except ValueError as error:
        assert "bf16" in str(error)
    else:
        assert isinstance(trainer.args, FocalPOConfig) and trainer.args.gamma == 0.5


@pytest.mark.parametrize(
    ("overrides", "error", "name"),
    [
        ({"beta": 0.0}, ValueError, "beta"),
        ({"max_length": "512"}, TypeError, "max_length"),
        ({"gamma": 1e400}, ValueError, "gamma"),
    ],
)
def test_focalpo_config_names_the_field(tmp_path, overrides, error, name):
    with pytest.raises(error, match=name):
        focal_args(tmp_path, **overrides)


def test_focalpo_config_accepts_numpy_scalars(tmp_path):
    import numpy as np

    args = focal_args(tmp_path, gamma=np.float32(0.25), beta=np.float64(0.2))
    assert (args.gamma, args.beta) == (0.25, 0.2) and type(args.gamma) is float


def test_focalpo_trainer_checks_rows_and_warns_about_identical_pairs(tokenizer, tmp_path):
    def build(rows):
        return FocalPOTrainer(
            model=make_model(tokenizer),
            ref_model=make_model(tokenizer, seed=1),
            args=focal_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )

    rows = make_preference_dataset(4, seed=0, conversational=True).to_list()
    rows[1]["prompt"] = [{"from": "human", "value": "sort: 2 1"}]
    with pytest.raises(ValueError, match=r"train_dataset row 1: prompt, message 0: has \['from'"):
        build(rows)
    rows = make_preference_dataset(4, seed=0).to_list()
    rows[2]["rejected"] = rows[2]["chosen"] + tokenizer.eos_token
    with pytest.warns(UserWarning, match=r"train_dataset: 1 pair\(s\) of 4 have the same chosen"):
        build(rows)


def test_focalpo_trainer_zeroes_a_non_finite_batch_and_counts_it(tokenizer, tmp_path):
    trainer = FocalPOTrainer(
        model=make_model(tokenizer),
        ref_model=make_model(tokenizer, seed=1),
        args=focal_args(tmp_path),
        train_dataset=make_preference_dataset(4, seed=0),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    nan_ref = (torch.tensor([0.0, torch.nan, 0.0, 0.0]), torch.zeros(4))
    trainer.compute_ref_log_probs = lambda model, inputs: nan_ref
    trainer.model.train()
    with pytest.warns(UserWarning, match="train step 1: a log-prob of this batch is NaN"):
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in grads)
    metrics = trainer._metrics["train"]
    assert metrics["nonfinite_fraction"] == [1.0]
    assert len(metrics["rewards/margins"]) == 1  # over the three finite pairs


# --- train()'s own arguments --------------------------------------------------------------------


def test_train_names_a_wrong_model_or_tokenizer(tokenizer, small_model):
    dataset = make_preference_dataset(8)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got NoneType"):
        train(None, tokenizer, dataset, config=config())
    with pytest.raises(TypeError, match=r"ref_model must be a torch\.nn\.Module, got str"):
        train(small_model(), tokenizer, dataset, config=config(), ref_model="gpt2")
    with pytest.raises(TypeError, match=r"tokenizer must be a Hugging Face tokenizer"):
        train(small_model(), object(), dataset, config=config())


def test_train_accepts_a_dict_of_lists_and_a_dataframe(tokenizer, small_model):
    import pandas as pd

    dataset = make_preference_dataset(8, seed=0)
    expected = train(small_model(), tokenizer, dataset, config=config(max_steps=2)).history
    for same_data in (dataset.to_dict(), pd.DataFrame(dataset.to_list())):
        got = train(small_model(), tokenizer, same_data, config=config(max_steps=2)).history
        assert [r["loss"] for r in got] == [r["loss"] for r in expected]


def test_an_interrupt_in_an_evaluation_leaves_the_model_training(tokenizer, small_model):
    model = small_model()
    eval_forwards = []

    def interrupt_the_step_0_evaluation(module, args, kwargs):
        if not module.training:
            eval_forwards.append(1)
            if len(eval_forwards) == 4:  # 2 train and 1 eval batches of the reference pass first
                raise KeyboardInterrupt

    model.register_forward_pre_hook(interrupt_the_step_0_evaluation, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        train(
            model,
            tokenizer,
            make_preference_dataset(8),
            make_preference_dataset(4),
            config=config(),
        )
    assert model.training


def test_focalpo_trainer_carries_on_past_a_non_finite_batch(tokenizer, tmp_path):
    args = focal_args(
        tmp_path,
        max_steps=3,
        logging_steps=1,
        per_device_train_batch_size=4,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-3,
    )
    trainer = FocalPOTrainer(
        model=make_model(tokenizer),
        ref_model=make_model(tokenizer, seed=1),
        args=args,
        train_dataset=make_preference_dataset(12, seed=0),
        processing_class=tokenizer,
    )
    live = trainer.compute_ref_log_probs
    calls = []

    def nan_on_the_second_batch(model, inputs):
        calls.append(1)
        chosen, rejected = live(model, inputs)
        return (chosen * torch.nan, rejected) if len(calls) == 2 else (chosen, rejected)

    trainer.compute_ref_log_probs = nan_on_the_second_batch
    with pytest.warns(UserWarning, match="train step 2: a log-prob of this batch is NaN"):
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["nonfinite_fraction"] for entry in logs] == [0.0, 1.0, 0.0]
    assert logs[1]["loss"] == 0.0 and "rewards/margins" not in logs[1]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def nan_logits_in_eval_forward(model, number):
    """Make the model's ``number``-th forward pass in eval mode return NaN logits."""
    seen = []

    def hook(module, args, output):
        if not module.training:
            seen.append(1)
            if len(seen) == number:
                output.logits = output.logits * torch.nan
        return output

    model.register_forward_hook(hook)


def test_a_non_finite_reference_or_evaluation_stops_naming_it(tokenizer, small_model, tmp_path):
    train_set, eval_set = make_preference_dataset(8), make_preference_dataset(4, seed=1)
    model = small_model()
    nan_logits_in_eval_forward(model, 2)  # the reference pass: 2 train batches, then 1 eval
    with pytest.raises(NonFiniteError, match="the reference on train_dataset: logits must be"):
        train(model, tokenizer, train_set, eval_set, config=config())
    model = small_model()
    nan_logits_in_eval_forward(model, 3 + 3)  # after the reference: evaluations at 0, 1, 2
    cfg = config(eval_every=1, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(NonFiniteError, match="evaluation at step 2: logits must be finite"):
        train(model, tokenizer, train_set, eval_set, config=cfg)
    assert checkpoint.read(tmp_path)["progress"]["step"] == 1  # the last good one is kept
