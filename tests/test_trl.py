"""FocalPOTrainer against TRL's own DPOTrainer, against an independent log-prob computation,
with PEFT, and with precomputed reference log-probs."""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from focalpo_mini.data import make_preference_dataset
from focalpo_mini.losses import focalpo_loss
from focalpo_mini.tiny import make_model
from focalpo_mini.trl import FocalPOConfig, FocalPOTrainer

STEPS = 3
# A reference that differs from the policy, so rewards and margins are non-zero from step 1.
REF_SEED = 1
TRL_METRICS = [
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
]


def _args(tmp_path, config_cls=FocalPOConfig, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    return config_cls(**{**settings, **overrides})


class _RecordingTrainer(FocalPOTrainer):
    """Keeps a copy of every batch it computes a loss on."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.batches = [*getattr(self, "batches", []), {k: v.clone() for k, v in inputs.items()}]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _train(trainer_cls, args, tokenizer, dataset, *, ref_seed=REF_SEED, **kwargs):
    ref_model = None if ref_seed is None else make_model(tokenizer, seed=ref_seed)
    trainer = trainer_cls(
        model=make_model(tokenizer, seed=0),
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        **kwargs,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == STEPS
    return trainer, logs


def _naive_logps(model, batch):
    """Summed completion log-probs (chosen, rejected) from the full logits, not TRL's fused head."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    token_logps = token_logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1).chunk(2)


@pytest.fixture(scope="module")
def dataset():
    return make_preference_dataset(24, seed=0)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tokenizer, dataset):
    args = _args(tmp_path_factory.mktemp("dpo"), DPOConfig, loss_type=["sigmoid"])
    return _train(DPOTrainer, args, tokenizer, dataset)


@pytest.fixture(scope="module")
def focal_run(tmp_path_factory, tokenizer, dataset):
    args = _args(tmp_path_factory.mktemp("focal"), gamma=0.5)
    return _train(_RecordingTrainer, args, tokenizer, dataset)


def test_gamma_zero_logs_what_dpo_trainer_logs(tmp_path, tokenizer, dataset, dpo_run):
    trainer, logs = _train(FocalPOTrainer, _args(tmp_path, gamma=0.0), tokenizer, dataset)
    dpo_trainer, dpo_logs = dpo_run
    assert dpo_logs[0]["rewards/margins"] != 0.0  # the reference differs, so this is not 0 == 0
    assert len({entry["loss"] for entry in logs}) == STEPS  # the steps really train
    for focal, dpo in zip(logs, dpo_logs, strict=True):
        for name in TRL_METRICS:
            assert focal[name] == pytest.approx(dpo[name], abs=1e-5), name
        assert focal["focal/weight_mean"] == 1.0
    # Evaluation goes through compute_loss too, in eval mode.
    held_out = make_preference_dataset(8, seed=1)
    focal_eval, dpo_eval = trainer.evaluate(held_out), dpo_trainer.evaluate(held_out)
    for name in ["eval_loss", "eval_rewards/margins", "eval_logps/chosen"]:
        assert focal_eval[name] == pytest.approx(dpo_eval[name], abs=1e-5), name


def test_gamma_half_logs_focalpo_loss_of_independent_logps(tokenizer, focal_run, dpo_run):
    trainer, logs = focal_run
    assert abs(logs[0]["loss"] - dpo_run[1][0]["loss"]) > 0.05
    # Step 1 sees the initial policy and reference: recompute everything from the recorded batch.
    batch = trainer.batches[0]
    policy = _naive_logps(make_model(tokenizer, seed=0), batch)
    reference = _naive_logps(make_model(tokenizer, seed=REF_SEED), batch)
    expected = focalpo_loss(*policy, *reference, beta=0.1, gamma=0.5)
    assert logs[0]["loss"] == pytest.approx(expected.item(), abs=1e-5)
    z = 0.1 * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
    weight = torch.exp(0.5 * F.logsigmoid(z)).mean().item()
    assert logs[0]["focal/weight_mean"] == pytest.approx(weight, abs=1e-6)
    assert logs[0]["logps/chosen"] == pytest.approx(policy[0].mean().item(), abs=1e-4)


def test_detached_weight_same_loss_different_gradient(tmp_path, tokenizer, dataset, focal_run):
    _, logs = _train(
        FocalPOTrainer, _args(tmp_path, gamma=0.5, detach_weight=True), tokenizer, dataset
    )
    in_graph = focal_run[1]
    assert logs[0]["loss"] == pytest.approx(in_graph[0]["loss"], abs=1e-6)
    assert abs(logs[0]["grad_norm"] - in_graph[0]["grad_norm"]) > 1e-3


def test_precomputed_reference_matches_live_reference(tmp_path, tokenizer, dataset, focal_run):
    args = _args(tmp_path, gamma=0.5, precompute_ref_log_probs=True)
    trainer, logs = _train(FocalPOTrainer, args, tokenizer, dataset)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    for precomputed, live in zip(logs, focal_run[1], strict=True):
        assert precomputed["loss"] == pytest.approx(live["loss"], abs=1e-5)


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory, tokenizer, dataset):
    args = _args(tmp_path_factory.mktemp("peft"), gamma=0.0)
    return _train(FocalPOTrainer, args, tokenizer, dataset, ref_seed=None, peft_config=_lora())


def test_peft_reference_is_the_adapter_switched_off(tokenizer, peft_run):
    trainer, logs = peft_run
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert logs[0]["focal/weight_mean"] == 1.0
    base = make_model(tokenizer, seed=0).state_dict()
    changed_adapters = 0
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            changed_adapters += "lora_B" in name and bool(param.detach().abs().sum() > 0)
        else:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param.detach(), base[key]), name
    assert changed_adapters > 0


def test_peft_with_precomputed_reference(tmp_path, tokenizer, dataset, peft_run):
    args = _args(tmp_path, gamma=0.0, precompute_ref_log_probs=True)
    _, logs = _train(FocalPOTrainer, args, tokenizer, dataset, ref_seed=None, peft_config=_lora())
    for precomputed, live in zip(logs, peft_run[1], strict=True):
        assert precomputed["loss"] == pytest.approx(live["loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "error", "named"),
    [
        ({"gamma": -0.5}, ValueError, "gamma"),
        ({"gamma": float("nan")}, ValueError, "gamma"),
        ({"gamma": "0.5"}, TypeError, "gamma"),
        ({"detach_weight": 1}, TypeError, "detach_weight"),
        ({"loss_type": ["hinge"]}, ValueError, "loss_type"),
        ({"ld_alpha": 0.5}, ValueError, "ld_alpha"),
    ],
)
def test_config_rejects_bad_settings(tmp_path, overrides, error, named):
    with pytest.raises(error, match=named):
        _args(tmp_path, **overrides)


def test_config_defaults(tmp_path):
    args = _args(tmp_path)
    assert (args.gamma, args.detach_weight) == (0.5, False)


def _trl_gradients(tokenizer, dataset, gamma, detach_weight, tmp_path):
    """FocalPOTrainer's loss and parameter gradients on the first four pairs, and its batch."""
    args = _args(tmp_path, gamma=gamma, detach_weight=detach_weight)
    trainer = FocalPOTrainer(
        model=make_model(tokenizer, seed=0),
        ref_model=make_model(tokenizer, seed=REF_SEED),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return trainer, batch, loss, {n: p.grad for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("detach_weight", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_from_scratch_trainer_has_the_same_loss_and_gradients(
    tmp_path, tokenizer, dataset, gamma, detach_weight
):
    from focalpo_mini.pairs import batch_logps, collate, prepare_pairs
    from focalpo_mini.trainer import TrainConfig
    from focalpo_mini.trainer import preference_loss as scratch_loss

    _, trl_batch, trl_loss, trl_grads = _trl_gradients(
        tokenizer, dataset, gamma, detach_weight, tmp_path
    )
    pairs, _, _ = prepare_pairs(tokenizer, dataset.select(range(4)), max_length=1024)
    batch = collate(pairs, tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], trl_batch[key]), key  # the same tokens, mask and layout
    with torch.no_grad():
        reference = batch_logps(make_model(tokenizer, seed=REF_SEED), batch)
    model = make_model(tokenizer, seed=0)
    config = TrainConfig(gamma=gamma, detach_weight=detach_weight, batch_size=4, progress=False)
    loss, _, _ = scratch_loss(model, batch, *reference, config=config)
    loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    grads = dict(model.named_parameters())
    assert set(grads) == set(trl_grads)
    assert sum(g.abs().sum().item() for g in trl_grads.values()) > 0
    for name, param in grads.items():
        torch.testing.assert_close(param.grad, trl_grads[name], atol=1e-5, rtol=0, msg=name)


def test_compute_loss_returns_outputs_with_logits(tmp_path, tokenizer, dataset):
    trainer, batch, loss, _ = _trl_gradients(tokenizer, dataset, 0.5, False, tmp_path)
    again, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert again.item() == pytest.approx(loss.item(), abs=1e-6)
    assert outputs.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
