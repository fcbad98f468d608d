"""The losses and gradient_weight: exact, stable, and strict about their inputs.

References are independent of the code under test: autograd, closed forms written with sigmoid and
pow, and PyTorch's binary_cross_entropy_with_logits.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from focalpo_mini.losses import (
    DEFAULT_FOCALPO_GAMMA,
    dpo_loss,
    focal_loss,
    focalpo_loss,
    gradient_weight,
    preference_logits,
)

GAMMAS = [0.0, 0.05, 0.5, 1.0, 2.0]
HALF_AND_FULL = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def random_logps(n=64, dtype=torch.float64, seed=0):
    """Four (n,) tensors shaped like summed completion log-probs (negative, tens of nats)."""
    g = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]


def logps_for(z):
    """Log-probs whose preference logit with beta=1 is exactly z (policy_chosen = z, rest 0)."""
    zeros = torch.zeros_like(z)
    return z, zeros, zeros.clone(), zeros.clone()


def sigmoid_focalpo(z, gamma):
    """FocalPO loss written naively from its definition, -sigmoid(z)**gamma * log(sigmoid(z))."""
    p = torch.sigmoid(z)
    return -(p**gamma) * torch.log(p)


# --- exactness -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ref_.* require")  # the reference's gradient is compared
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("detach_weight", [False, True])
def test_focalpo_with_gamma_zero_is_dpo(reduction, detach_weight):
    logps = [t.requires_grad_() for t in random_logps()]
    dpo = dpo_loss(*logps, beta=0.1, reduction=reduction)
    focal = focalpo_loss(
        *logps, beta=0.1, gamma=0.0, detach_weight=detach_weight, reduction=reduction
    )
    torch.testing.assert_close(focal, dpo, rtol=0, atol=1e-12)
    dpo_grads = torch.autograd.grad(dpo.sum(), logps)
    focal_grads = torch.autograd.grad(focal.sum(), logps)
    for got, expected in zip(focal_grads, dpo_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_dpo_loss_matches_its_definition():
    pc, pr, rc, rr = random_logps()
    beta = 0.3
    expected = -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr))))
    torch.testing.assert_close(
        dpo_loss(pc, pr, rc, rr, beta=beta, reduction="none"), expected, rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        preference_logits(pc, pr, rc, rr, beta=beta), beta * (pc - rc - pr + rr)
    )


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focalpo_loss_matches_its_definition(gamma):
    logps = random_logps()
    z = preference_logits(*logps, beta=0.1)
    got = focalpo_loss(*logps, beta=0.1, gamma=gamma, reduction="none")
    torch.testing.assert_close(got, sigmoid_focalpo(z, gamma), rtol=1e-12, atol=0)


def test_reductions_agree():
    logps = random_logps()
    per_pair = focalpo_loss(*logps, reduction="none")
    assert per_pair.shape == (64,)
    torch.testing.assert_close(focalpo_loss(*logps, reduction="sum"), per_pair.sum())
    torch.testing.assert_close(focalpo_loss(*logps, reduction="mean"), per_pair.mean())


def test_default_gamma_is_the_documented_one():
    logps = random_logps()
    expected = focalpo_loss(*logps, gamma=DEFAULT_FOCALPO_GAMMA)
    assert DEFAULT_FOCALPO_GAMMA == 0.5
    torch.testing.assert_close(focalpo_loss(*logps), expected, rtol=0, atol=0)


@pytest.mark.parametrize("detach_weight", [False, True])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_gradient_weight_equals_autograd(gamma, detach_weight):
    z = torch.linspace(-30, 30, 1201, dtype=torch.float64, requires_grad=True)
    loss = focalpo_loss(
        *logps_for(z), beta=1.0, gamma=gamma, detach_weight=detach_weight, reduction="sum"
    )
    (dloss_dz,) = torch.autograd.grad(loss, z)
    expected = -dloss_dz
    got = gradient_weight(z.detach(), gamma=gamma, detach_weight=detach_weight)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_dpo_gradient_weight_is_one_minus_sigmoid():
    z = torch.linspace(-30, 30, 601, dtype=torch.float64)
    torch.testing.assert_close(gradient_weight(z), 1 - torch.sigmoid(z), rtol=0, atol=1e-15)


def test_beta_scales_the_gradient_with_respect_to_h():
    """dL/dh = beta * dL/dz: the weight is per unit of z, as documented."""
    h = torch.linspace(-50, 50, 101, dtype=torch.float64, requires_grad=True)
    beta = 0.1
    (grad,) = torch.autograd.grad(focalpo_loss(*logps_for(h), beta=beta, reduction="sum"), h)
    torch.testing.assert_close(-grad, beta * gradient_weight(beta * h.detach(), gamma=0.5))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25, 0.9])
def test_focal_loss_matches_closed_form_and_its_autograd(gamma, alpha):
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(200, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 2, (200,), generator=g).to(torch.float64)
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = 1.0 if alpha is None else alpha * targets + (1 - alpha) * (1 - targets)
    expected = (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()
    got = focal_loss(logits, targets, gamma=gamma, alpha=alpha)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    (got_grad,) = torch.autograd.grad(got, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_loss_gamma_zero_no_alpha_is_binary_cross_entropy(reduction):
    g = torch.Generator().manual_seed(2)
    logits = 10 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 2, (5, 7), generator=g).to(torch.float64)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)
    got = focal_loss(logits, targets, gamma=0.0, alpha=None, reduction=reduction)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.int64, torch.float32])
def test_focal_loss_accepts_bool_integer_and_float_targets(target_dtype):
    logits = torch.tensor([-2.0, -0.5, 0.5, 3.0])
    targets = torch.tensor([0, 1, 0, 1])
    expected = focal_loss(logits, targets.float())
    torch.testing.assert_close(focal_loss(logits, targets.to(target_dtype)), expected)


def test_focal_loss_and_focalpo_modulate_in_opposite_directions():
    """Focal loss keeps more of a wrong example's loss; FocalPO keeps less of a misranked pair's."""
    logits = torch.tensor([-3.0, 3.0], dtype=torch.float64)  # a wrong and a right prediction of 1
    kept_focal = focal_loss(logits, torch.ones(2), alpha=None, reduction="none") / F.softplus(
        -logits
    )
    kept_focalpo = focalpo_loss(
        *logps_for(logits), beta=1.0, gamma=2.0, reduction="none"
    ) / F.softplus(-logits)
    assert kept_focal[0] > kept_focal[1]
    assert kept_focalpo[0] < kept_focalpo[1]


# --- stability -----------------------------------------------------------------------------------


def extreme_z(dtype):
    return torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.tensor([-1e4, -0.0, 1e4])]).to(dtype)


@pytest.mark.parametrize("detach_weight", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("dtype", HALF_AND_FULL)
def test_losses_and_gradients_finite_for_extreme_z(dtype, gamma, detach_weight):
    z = extreme_z(dtype).requires_grad_()
    losses = {
        "dpo": dpo_loss(*logps_for(z), beta=1.0, reduction="none"),
        "focalpo": focalpo_loss(
            *logps_for(z), beta=1.0, gamma=gamma, detach_weight=detach_weight, reduction="none"
        ),
    }
    returned = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    for name, loss in losses.items():
        assert loss.dtype == returned, name
        assert torch.isfinite(loss).all(), name
        assert (loss >= 0).all(), name
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert grad.dtype == dtype, name
        assert torch.isfinite(grad).all(), name
    weight = gradient_weight(z.detach(), gamma=gamma, detach_weight=detach_weight)
    assert weight.dtype == returned
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize("dtype", HALF_AND_FULL)
def test_focal_loss_finite_for_extreme_logits(dtype):
    logits = extreme_z(dtype).requires_grad_()
    targets = torch.arange(logits.numel()) % 2
    loss = focal_loss(logits, targets, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert grad.dtype == dtype
    assert loss.dtype == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss >= 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(dtype):
    """A half input gives exactly the float32 result on the same values, returned in float32."""
    logps = random_logps(dtype=dtype)
    for reduction in ("none", "sum"):
        got = focalpo_loss(*logps, gamma=0.5, reduction=reduction)
        expected = focalpo_loss(*[t.float() for t in logps], gamma=0.5, reduction=reduction)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_float64_stays_float64():
    logps = random_logps()
    assert dpo_loss(*logps).dtype == torch.float64
    assert focalpo_loss(*logps).dtype == torch.float64
    assert preference_logits(*logps, beta=0.1).dtype == torch.float64


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_large_negative_z_grows_linearly_times_p_to_the_gamma(gamma):
    z = torch.tensor([-100.0, -300.0], dtype=torch.float64)
    loss = focalpo_loss(*logps_for(z), beta=1.0, gamma=gamma, reduction="none")
    torch.testing.assert_close(loss, -z * torch.exp(gamma * z), rtol=1e-12, atol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_large_positive_z_tends_to_zero(gamma):
    z = torch.tensor([40.0, 200.0, 1e4], dtype=torch.float64)
    loss = focalpo_loss(*logps_for(z), beta=1.0, gamma=gamma, reduction="none")
    torch.testing.assert_close(loss, torch.exp(-z), rtol=1e-12, atol=0)
    assert loss[-1] == 0.0


# --- properties ----------------------------------------------------------------------------------

z_values = st.floats(min_value=-200.0, max_value=200.0, allow_nan=False)
gammas = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)


def focalpo_at(z, gamma, detach_weight=False):
    t = torch.tensor([z], dtype=torch.float64)
    return focalpo_loss(
        *logps_for(t), beta=1.0, gamma=gamma, detach_weight=detach_weight, reduction="none"
    ).item()


def sign_flip_logit(gamma):
    """The z at which p = sigmoid(z) = exp(-1/gamma)."""
    return -1.0 / gamma - math.log1p(-math.exp(-1.0 / gamma))


@settings(max_examples=200, deadline=None)
@given(z=z_values, gamma=gammas)
def test_losses_are_non_negative_and_focalpo_at_most_dpo(z, gamma):
    dpo = focalpo_at(z, 0.0)
    focal = focalpo_at(z, gamma)
    assert dpo >= 0.0
    assert focal >= 0.0
    assert focal <= dpo
    assert focal_loss(torch.tensor([z]), torch.tensor([1.0]), gamma=gamma).item() >= 0.0


@settings(max_examples=200, deadline=None)
@given(z1=z_values, z2=z_values)
def test_dpo_loss_decreases_in_z(z1, z2):
    low, high = sorted((z1, z2))
    assert focalpo_at(low, 0.0) >= focalpo_at(high, 0.0)


@settings(max_examples=200, deadline=None)
@given(z1=z_values, z2=z_values, gamma=st.floats(min_value=0.05, max_value=5.0))
def test_focalpo_loss_decreases_in_z_above_the_sign_flip_and_increases_below(z1, z2, gamma):
    """-p**gamma log p peaks at p = exp(-1/gamma): it only decreases in z above that point."""
    low, high = sorted((z1, z2))
    z_flip = sign_flip_logit(gamma)
    if low >= z_flip:
        assert focalpo_at(low, gamma) >= focalpo_at(high, gamma)
    elif high <= z_flip:
        assert focalpo_at(low, gamma) <= focalpo_at(high, gamma)


@settings(max_examples=200, deadline=None)
@given(z=st.floats(min_value=-100.0, max_value=100.0), gamma=gammas)
def test_detached_weight_is_dpo_weight_times_p_to_the_gamma(z, gamma):
    t = torch.tensor([z], dtype=torch.float64)
    expected = gradient_weight(t) * torch.sigmoid(t) ** gamma
    got = gradient_weight(t, gamma=gamma, detach_weight=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@settings(max_examples=300, deadline=None)
@given(z=st.floats(min_value=-60.0, max_value=60.0), gamma=st.floats(min_value=0.05, max_value=5.0))
def test_in_graph_weight_is_positive_exactly_above_p_equals_exp_minus_one_over_gamma(z, gamma):
    z_flip = sign_flip_logit(gamma)
    if abs(z - z_flip) < 1e-9:
        return
    weight = gradient_weight(torch.tensor([z], dtype=torch.float64), gamma=gamma).item()
    assert (weight > 0) == (z > z_flip)
    assert (
        gradient_weight(torch.tensor([z], dtype=torch.float64), gamma=gamma, detach_weight=True) > 0
    )


@pytest.mark.parametrize("gamma", [0.05, 0.5, 1.0, 2.0])
def test_in_graph_weight_vanishes_at_the_sign_flip(gamma):
    z_flip = torch.tensor([sign_flip_logit(gamma)], dtype=torch.float64)
    assert math.isclose(torch.sigmoid(z_flip).item(), math.exp(-1 / gamma), rel_tol=1e-12)
    assert abs(gradient_weight(z_flip, gamma=gamma).item()) < 1e-12


# --- bad input -----------------------------------------------------------------------------------


def good_logps(n=4):
    return random_logps(n=n, dtype=torch.float32)


def with_replaced(index, value):
    logps = good_logps()
    logps[index] = value
    return logps


LOGPS_NAMES = [
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
]

BAD_PAIR_INPUTS = [
    # (logps, kwargs, error, argument named in the message)
    (good_logps(), {"beta": 0.0}, ValueError, "beta"),
    (good_logps(), {"beta": -0.1}, ValueError, "beta"),
    (good_logps(), {"beta": float("nan")}, ValueError, "beta"),
    (good_logps(), {"beta": "0.1"}, TypeError, "beta"),
    (good_logps(), {"reduction": "avg"}, ValueError, "reduction"),
    (with_replaced(3, torch.zeros(3)), {}, ValueError, "ref_rejected_logps"),
    (with_replaced(0, torch.zeros(4, 1)), {}, ValueError, "policy_chosen_logps"),
    (with_replaced(1, torch.zeros(4, dtype=torch.int64)), {}, TypeError, "policy_rejected_logps"),
    (with_replaced(1, [0.0, 0.0, 0.0, 0.0]), {}, TypeError, "policy_rejected_logps"),
    (
        with_replaced(2, torch.tensor([0.0, float("nan"), 0.0, 0.0])),
        {},
        ValueError,
        "ref_chosen_logps",
    ),
    (
        with_replaced(3, torch.tensor([0.0, 0.0, float("-inf"), 0.0])),
        {},
        ValueError,
        "ref_rejected_logps",
    ),
    ([torch.zeros(0)] * 4, {}, ValueError, "policy_chosen_logps"),
]


@pytest.mark.parametrize(("logps", "kwargs", "error", "name"), BAD_PAIR_INPUTS)
@pytest.mark.parametrize("loss_fn", [dpo_loss, focalpo_loss])
def test_bad_pair_inputs_are_rejected_naming_the_argument(loss_fn, logps, kwargs, error, name):
    with pytest.raises(error, match=name):
        loss_fn(*logps, **kwargs)


@pytest.mark.parametrize(
    ("logps", "kwargs", "error", "name"), [c for c in BAD_PAIR_INPUTS if c[3] != "reduction"]
)
def test_preference_logits_rejects_bad_inputs(logps, kwargs, error, name):
    with pytest.raises(error, match=name):
        preference_logits(*logps, beta=kwargs.get("beta", 0.1))


@pytest.mark.parametrize("position", [0, 37, -1])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", HALF_AND_FULL)
def test_non_finite_values_are_found_anywhere_in_any_dtype(dtype, value, position):
    logps = random_logps(dtype=dtype)
    logps[2][position] = value
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        focalpo_loss(*logps)


def test_huge_finite_float64_values_are_accepted():
    logps = random_logps()
    logps[0][0] = -1e300
    assert focalpo_loss(*logps, reduction="none")[0] == 0.0  # z = -1e299: p**gamma underflows


@pytest.mark.parametrize(
    ("gamma", "error"),
    [(-1.0, ValueError), (float("inf"), ValueError), ("2", TypeError), (True, TypeError)],
)
def test_bad_gamma_is_rejected_everywhere(gamma, error):
    with pytest.raises(error, match="gamma"):
        focalpo_loss(*good_logps(), gamma=gamma)
    with pytest.raises(error, match="gamma"):
        focal_loss(torch.zeros(3), torch.ones(3), gamma=gamma)
    with pytest.raises(error, match="gamma"):
        gradient_weight(torch.zeros(3), gamma=gamma)


def test_bad_detach_weight_is_rejected():
    with pytest.raises(TypeError, match="detach_weight"):
        focalpo_loss(*good_logps(), detach_weight="yes")
    with pytest.raises(TypeError, match="detach_weight"):
        gradient_weight(torch.zeros(3), detach_weight=1)


@pytest.mark.parametrize(
    ("logits", "targets", "kwargs", "error", "name"),
    [
        (torch.zeros(3, dtype=torch.int64), torch.ones(3), {}, TypeError, "logits"),
        (torch.tensor([0.0, float("nan"), 1.0]), torch.ones(3), {}, ValueError, "logits"),
        (torch.zeros(0), torch.zeros(0), {}, ValueError, "logits"),
        (torch.zeros(3), torch.ones(4), {}, ValueError, "targets"),
        (torch.zeros(3), [1, 0, 1], {}, TypeError, "targets"),
        (torch.zeros(3), torch.tensor([0.0, 0.5, 1.0]), {}, ValueError, "targets"),
        (torch.zeros(3), torch.tensor([0, 2, 1]), {}, ValueError, "targets"),
        (torch.zeros(3), torch.ones(3), {"alpha": 1.5}, ValueError, "alpha"),
        (torch.zeros(3), torch.ones(3), {"alpha": -0.1}, ValueError, "alpha"),
        (torch.zeros(3), torch.ones(3), {"reduction": "batchmean"}, ValueError, "reduction"),
    ],
)
def test_focal_loss_rejects_bad_inputs(logits, targets, kwargs, error, name):
    with pytest.raises(error, match=name):
        focal_loss(logits, targets, **kwargs)


@pytest.mark.parametrize(
    ("z", "error"),
    [
        (torch.zeros(3, dtype=torch.int64), TypeError),
        (torch.tensor([0.0, float("inf")]), ValueError),
        (torch.zeros(0), ValueError),
        (0.5, TypeError),
    ],
)
def test_gradient_weight_rejects_bad_z(z, error):
    with pytest.raises(error, match="z"):
        gradient_weight(z, gamma=0.5)
