"""preference_metrics (what TRL 1.16's DPOTrainer logs, plus the mean modulating factor) and
group_metrics (Chen et al.'s groups)."""

import math

import pytest
import torch

from focalpo_mini.metrics import group_metrics, preference_metrics

TRL_NAMES = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}

# Two pairs: the first ranked right by the implicit reward, the second wrong.
POLICY_CHOSEN = [-10.0, -30.0]
POLICY_REJECTED = [-20.0, -25.0]
REF_CHOSEN = [-12.0, -28.0]
REF_REJECTED = [-18.0, -26.0]


def as_tensors(dtype=torch.float64):
    return [
        torch.tensor(v, dtype=dtype)
        for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)
    ]


def test_values_match_a_hand_computation():
    beta = 0.5
    chosen_rewards = [beta * (p - r) for p, r in zip(POLICY_CHOSEN, REF_CHOSEN, strict=True)]
    rejected_rewards = [beta * (p - r) for p, r in zip(POLICY_REJECTED, REF_REJECTED, strict=True)]
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards, strict=True)]
    expected = {
        "rewards/chosen": sum(chosen_rewards) / 2,
        "rewards/rejected": sum(rejected_rewards) / 2,
        "rewards/margins": sum(margins) / 2,
        "rewards/accuracies": 0.5,
        "logps/chosen": sum(POLICY_CHOSEN) / 2,
        "logps/rejected": sum(POLICY_REJECTED) / 2,
    }
    got = preference_metrics(*as_tensors(), beta=beta)
    assert got == pytest.approx(expected, rel=1e-12)
    assert all(isinstance(v, float) for v in got.values())


def test_focal_weight_mean_is_the_mean_modulating_factor():
    beta, gamma = 0.5, 2.0
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, pr, rc, rr in zip(
            POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, strict=True
        )
    ]
    expected = sum((1 / (1 + math.exp(-z))) ** gamma for z in margins) / len(margins)
    got = preference_metrics(*as_tensors(), beta=beta, gamma=gamma)
    assert set(got) == TRL_NAMES | {"focal/weight_mean"}
    assert got["focal/weight_mean"] == pytest.approx(expected, rel=1e-12)
    assert preference_metrics(*as_tensors(), beta=beta, gamma=0.0)["focal/weight_mean"] == 1.0


def test_without_gamma_only_trl_names():
    assert set(preference_metrics(*as_tensors(), beta=0.1)) == TRL_NAMES


def test_ties_count_as_wrong_like_trl():
    """Policy equal to reference: every reward is 0 and TRL's strict '>' gives accuracy 0."""
    logps = torch.tensor([-5.0, -7.0])
    got = preference_metrics(logps, logps, logps, logps, beta=0.1, gamma=1.0)
    assert got["rewards/accuracies"] == 0.0
    assert got["rewards/margins"] == 0.0
    assert got["focal/weight_mean"] == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_summarised_in_float32(dtype):
    half = as_tensors(dtype)
    expected = preference_metrics(*[t.float() for t in half], beta=0.1, gamma=0.5)
    assert preference_metrics(*half, beta=0.1, gamma=0.5) == expected


def test_does_not_track_gradients():
    logps = [t.requires_grad_() for t in as_tensors()]
    preference_metrics(*logps, beta=0.1, gamma=0.5)
    assert all(t.grad is None for t in logps)


def test_equals_trl_logged_step0_metrics(trl_step_zero):
    """Fed TRL's own per-pair log-probs, our metrics equal what DPOTrainer logs on step 0."""
    from focalpo_mini import make_preference_dataset

    beta = 0.5
    step = trl_step_zero(make_preference_dataset(8, seed=5), beta=beta)
    policy_chosen, policy_rejected = step["policy_chosen_logps"], step["policy_rejected_logps"]
    ref_chosen, ref_rejected = step["ref_chosen_logps"], step["ref_rejected_logps"]
    got = preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)
    logged = step["logs"]
    assert 0.0 < logged["rewards/accuracies"] < 1.0  # the comparison below is not trivial
    for name in TRL_NAMES:
        assert got[name] == pytest.approx(logged[name], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize(
    ("change", "error", "name"),
    [
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": None}, TypeError, "beta"),
        ({"gamma": -0.5}, ValueError, "gamma"),
        ({"gamma": "1"}, TypeError, "gamma"),
        ({"ref_rejected_logps": torch.zeros(3)}, ValueError, "ref_rejected_logps"),
        ({"policy_chosen_logps": torch.tensor([0, 1])}, TypeError, "policy_chosen_logps"),
        ({"ref_chosen_logps": torch.tensor([0.0, float("nan")])}, ValueError, "ref_chosen_logps"),
    ],
)
def test_bad_inputs_are_rejected_naming_the_argument(change, error, name):
    pc, pr, rc, rr = as_tensors()
    kwargs = {
        "policy_chosen_logps": pc,
        "policy_rejected_logps": pr,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
        "beta": 0.1,
        **change,
    }
    with pytest.raises(error, match=name):
        preference_metrics(**kwargs)


def test_empty_batch_is_rejected():
    empty = torch.zeros(0)
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        preference_metrics(empty, empty, empty, empty, beta=0.1)


def test_group_metrics_partition_and_match_a_loop():
    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(50, generator=generator) * 3 for _ in range(4))
    metrics = group_metrics(pc, pr, rc, rr, beta=0.1)
    assert metrics["groups/ref_correct/count"] + metrics["groups/ref_incorrect/count"] == 50
    for group, in_group in (("ref_correct", True), ("ref_incorrect", False)):
        members = [i for i in range(50) if (rc[i].item() >= rr[i].item()) == in_group]
        z = [0.1 * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item() for i in members]
        assert metrics[f"groups/{group}/count"] == len(members)
        assert metrics[f"groups/{group}/margin"] == pytest.approx(sum(z) / len(z), abs=1e-6)
        reward_acc = sum(v > 0 for v in z) / len(z)
        ranking_acc = sum(pc[i].item() >= pr[i].item() for i in members) / len(members)
        assert metrics[f"groups/{group}/reward_accuracy"] == pytest.approx(reward_acc)
        assert metrics[f"groups/{group}/ranking_accuracy"] == pytest.approx(ranking_acc)
    empty = group_metrics(pc, pr, rc.abs() + 1, -rr.abs(), beta=0.1)
    assert empty["groups/ref_incorrect/count"] == 0
    assert math.isnan(empty["groups/ref_incorrect/margin"])
