"""The noisy-label baselines (cDPO, robust DPO, IPO) against TRL 1.16's own losses on one batch,
and as loss plug-ins of the from-scratch trainer."""

import pytest
import torch
import torch.nn.functional as F

from focalpo_mini import dpo_loss, make_model, make_preference_dataset
from focalpo_mini.baselines import conservative_dpo_loss, ipo_loss, robust_dpo_loss
from focalpo_mini.pairs import batch_logps
from focalpo_mini.trainer import TrainConfig, preference_loss, train


def _logps(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    return tuple(-20 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))


DATASET = make_preference_dataset(8, seed=3, noise=0.25)


def _our_loss(tokenizer, batch, config):
    """Our trainer's loss of TRL's batch: our log-probs of it, our dispatch to the loss."""
    with torch.no_grad():
        ref_chosen, ref_rejected = batch_logps(make_model(tokenizer, seed=1).eval(), batch)
        loss, _, _ = preference_loss(
            make_model(tokenizer, seed=0), batch, ref_chosen, ref_rejected, config=config
        )
    return loss.item()


@pytest.mark.parametrize(
    ("ours", "trl_name", "eps"),
    [("robust", "robust", 0.1), ("robust", "robust", 0.3), ("ipo", "ipo", 0.0)],
)
def test_trainer_loss_equals_trl_on_one_batch(trl_step_zero, tokenizer, ours, trl_name, eps):
    step = trl_step_zero(DATASET, loss_type=[trl_name], label_smoothing=eps)
    got = _our_loss(tokenizer, step["batch"], TrainConfig(loss=ours, label_smoothing=eps))
    assert got == pytest.approx(step["loss"], abs=1e-6, rel=1e-6)
    # and the comparison can fail: another epsilon gives another loss
    if ours == "robust":
        other = _our_loss(tokenizer, step["batch"], TrainConfig(loss=ours, label_smoothing=eps / 2))
        assert abs(other - step["loss"]) > 1e-4


def test_trl_sigmoid_ignores_label_smoothing(trl_step_zero):
    """Why cDPO is checked against binary cross-entropy below: TRL 1.16 has no cDPO."""
    plain = trl_step_zero(DATASET, label_smoothing=0.0)["loss"]
    assert trl_step_zero(DATASET, label_smoothing=0.2)["loss"] == pytest.approx(plain, abs=1e-7)


def test_conservative_dpo_is_cross_entropy_against_the_soft_label():
    logps = _logps()
    z = 0.1 * ((logps[0] - logps[2]) - (logps[1] - logps[3]))
    for eps in (0.0, 0.1, 0.4):
        expected = F.binary_cross_entropy_with_logits(z, torch.full_like(z, 1 - eps))
        got = conservative_dpo_loss(*logps, beta=0.1, label_smoothing=eps)
        assert got.item() == pytest.approx(expected.item(), abs=1e-12)


def test_zero_smoothing_is_dpo():
    logps = _logps(1)
    dpo = dpo_loss(*logps, beta=0.2)
    for loss in (conservative_dpo_loss, robust_dpo_loss):
        assert loss(*logps, beta=0.2, label_smoothing=0.0).item() == pytest.approx(dpo.item())


def test_conservative_gradient_vanishes_at_one_minus_eps():
    eps = 0.2
    h = (torch.logit(torch.tensor([1 - eps], dtype=torch.float64)) / 0.1).requires_grad_()
    zeros = torch.zeros(1, dtype=torch.float64)
    loss = conservative_dpo_loss(h, zeros, zeros, zeros, beta=0.1, label_smoothing=eps)
    loss.backward()
    assert abs(h.grad.item()) < 1e-12


def test_ipo_is_minimised_at_the_target_margin():
    lengths = torch.tensor([4.0])
    target = 4.0 / (2 * 0.1)  # per-token margin 1/(2 beta), times 4 tokens
    zeros = torch.zeros(1, dtype=torch.float64)
    at = torch.tensor([target], dtype=torch.float64)
    kwargs = {"beta": 0.1, "chosen_lengths": lengths, "rejected_lengths": lengths}
    assert ipo_loss(at, zeros, zeros, zeros, **kwargs).item() == pytest.approx(0.0, abs=1e-12)
    assert ipo_loss(zeros, zeros, zeros, zeros, **kwargs).item() == pytest.approx(25.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda lp: robust_dpo_loss(*lp, label_smoothing=0.5), "label_smoothing"),
        (lambda lp: conservative_dpo_loss(*lp, label_smoothing=-0.1), "label_smoothing"),
        (lambda lp: ipo_loss(*lp, chosen_lengths=None, rejected_lengths=None), "chosen_lengths"),
        (
            lambda lp: ipo_loss(*lp, chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(3)),
            "chosen_lengths",
        ),
        (
            lambda lp: ipo_loss(
                *lp, beta=0, chosen_lengths=torch.ones(64), rejected_lengths=torch.ones(64)
            ),
            "beta",
        ),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call(_logps())


def test_train_config_refuses_bad_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(loss="cdpo", label_smoothing=0.7)


@pytest.mark.parametrize("loss", ["cdpo", "robust", "ipo"])
def test_baselines_train_and_learn(tokenizer, small_model, one_thread, loss):
    data = make_preference_dataset(32, seed=0)
    config = TrainConfig(
        loss=loss,
        label_smoothing=0.1,
        learning_rate=5e-3,
        max_steps=6,
        batch_size=8,
        log_every=6,
        progress=False,
        eval_every=6,
    )
    result = train(small_model(), tokenizer, data, data, config=config)
    first, last = result.eval_history[0], result.eval_history[-1]
    assert last["rewards/margins"] > first["rewards/margins"]
    assert "focal/weight_mean" not in last or last["focal/weight_mean"] == pytest.approx(1.0)
