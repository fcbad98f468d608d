"""Property tests of the contract (README, "What every function promises") for the numerical
functions: losses, baselines, metrics, log-probs, ranking, statistics and the plot helpers.

Each test draws valid arguments, then either keeps them (the result must be right, finite, and in
the documented dtype) or replaces one argument by anything (see ``_contract.ANYTHING``): the call
must then return a finite result or raise TypeError/ValueError naming that argument.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from _contract import (
    ANYTHING,
    BETA,
    FLAG,
    GAMMA,
    RAISED,
    REDUCTION,
    assert_finite,
    call,
    expected_dtype,
    logps,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from focalpo_mini import baselines, logprobs, losses, metrics, ranking, stats, viz

LOGP_NAMES = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
)


def run(data, fn, args: dict, *, positional=(), aliases=None, allow_nan=False):
    """Call ``fn`` with ``args``, or with one of them replaced by anything; returns
    ``(result, replaced)``: the result (None if refused) and the replaced argument (None if none).
    """
    replaced = data.draw(st.sampled_from([None, *args]), label="replaced")
    if replaced is not None:
        args = {**args, replaced: data.draw(ANYTHING, label=replaced)}
    names = [replaced, *(aliases or {}).get(replaced, ())] if replaced else []
    result = call(
        fn,
        names,
        *(args[k] for k in positional),
        **{k: v for k, v in args.items() if k not in positional},
    )
    if result is RAISED:
        return None, replaced
    if not allow_nan:
        assert_finite(result)
    return result, replaced


@st.composite
def pair_batch(draw, names=LOGP_NAMES):
    n = draw(st.integers(1, 5))
    return {name: draw(logps(n)) for name in names}


def _z(args) -> torch.Tensor:
    h = (args["policy_chosen_logps"].double() - args["ref_chosen_logps"].double()) - (
        args["policy_rejected_logps"].double() - args["ref_rejected_logps"].double()
    )
    return float(args["beta"]) * h


def _reduced(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return {"mean": values.mean(), "sum": values.sum(), "none": values}[reduction]


def _close(result: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    tolerance = 1e-10 if dtype == torch.float64 else 2e-3
    return bool(torch.allclose(result.double(), expected, rtol=tolerance, atol=tolerance))


@settings(max_examples=150)
@given(st.data())
def test_dpo_and_focalpo_losses_keep_the_contract(data):
    args = {**data.draw(pair_batch()), "beta": data.draw(BETA), "reduction": data.draw(REDUCTION)}
    focal = data.draw(st.booleans())
    if focal:
        args |= {"gamma": data.draw(GAMMA), "detach_weight": data.draw(FLAG)}
    fn = losses.focalpo_loss if focal else losses.dpo_loss
    result, replaced = run(data, fn, args, positional=LOGP_NAMES)
    if replaced is None:
        assert result.dtype == expected_dtype(*(args[k] for k in LOGP_NAMES))
        z = _z(args)
        gamma = float(args.get("gamma", 0.0))
        per_pair = -torch.exp(gamma * F.logsigmoid(z)) * F.logsigmoid(z)  # float64, log space
        assert _close(result, _reduced(per_pair, args["reduction"]), result.dtype)


@settings(max_examples=100)
@given(st.data())
def test_noisy_label_baselines_keep_the_contract(data):
    batch = data.draw(pair_batch())
    n = len(batch["policy_chosen_logps"])
    kind = data.draw(st.sampled_from(["cdpo", "robust", "ipo"]))
    args = {**batch, "beta": data.draw(BETA), "reduction": data.draw(REDUCTION)}
    if kind == "ipo":
        lengths = st.lists(st.integers(0, 50), min_size=n, max_size=n).map(torch.tensor)
        args |= {"chosen_lengths": data.draw(lengths), "rejected_lengths": data.draw(lengths)}
        fn = baselines.ipo_loss
    else:
        args["label_smoothing"] = data.draw(st.floats(0.0, 0.49))
        fn = baselines.conservative_dpo_loss if kind == "cdpo" else baselines.robust_dpo_loss
    result, replaced = run(data, fn, args, positional=LOGP_NAMES)
    if replaced is None:
        assert result.dtype == expected_dtype(*(args[k] for k in LOGP_NAMES))
        if kind != "ipo":
            eps, z = args["label_smoothing"], _z(args)
            soft = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            robust = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
            expected = soft if kind == "cdpo" else robust
            assert _close(result, _reduced(expected, args["reduction"]), result.dtype)


@settings(max_examples=80)
@given(st.data())
def test_preference_logits_and_metrics_keep_the_contract(data):
    args = {**data.draw(pair_batch()), "beta": data.draw(BETA)}
    kind = data.draw(st.sampled_from(["logits", "metrics", "groups"]))
    if kind == "metrics":
        args["gamma"] = data.draw(st.one_of(st.none(), GAMMA))
    fn = {
        "logits": losses.preference_logits,
        "metrics": metrics.preference_metrics,
        "groups": metrics.group_metrics,
    }[kind]
    # group_metrics documents NaN for an empty group
    result, replaced = run(data, fn, args, positional=LOGP_NAMES, allow_nan=kind == "groups")
    if replaced is None and kind == "logits":
        assert _close(result, _z(args), result.dtype)
    if replaced is None and kind == "metrics":
        assert result["rewards/margins"] == pytest.approx(
            float(_z(args).mean()), rel=2e-3, abs=2e-3
        )


@settings(max_examples=80)
@given(st.data())
def test_focal_loss_and_gradient_weight_keep_the_contract(data):
    n = data.draw(st.integers(1, 5))
    logits = data.draw(logps(n)) + data.draw(st.floats(-10, 200))
    if data.draw(st.booleans()):
        targets = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        args = {
            "logits": logits,
            "targets": targets,
            "gamma": data.draw(GAMMA),
            "alpha": data.draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
            "reduction": data.draw(REDUCTION),
        }
        result, replaced = run(data, losses.focal_loss, args, positional=("logits", "targets"))
        if replaced is None:
            assert result.dtype == expected_dtype(logits)
            assert bool((result >= 0).all())
    else:
        args = {"z": logits, "gamma": data.draw(GAMMA), "detach_weight": data.draw(FLAG)}
        result, replaced = run(data, losses.gradient_weight, args, positional=("z",))
        if replaced is None:
            assert result.dtype == expected_dtype(logits) and result.shape == logits.shape


@settings(max_examples=60)
@given(st.data())
def test_sequence_logps_keeps_the_contract(data):
    batch, length, vocab = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 5)), 7
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    values = data.draw(
        st.lists(
            st.floats(-20, 20), min_size=batch * length * vocab, max_size=batch * length * vocab
        )
    )
    logits = torch.tensor(values, dtype=dtype).reshape(batch, length, vocab)
    labels = torch.tensor(
        data.draw(
            st.lists(st.integers(0, vocab - 1), min_size=batch * length, max_size=batch * length)
        )
    ).reshape(batch, length)
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[:, 1:] = 1
    args = {"logits": logits, "labels": labels, "completion_mask": mask, "average": data.draw(FLAG)}
    result, replaced = run(
        data, logprobs.sequence_logps, args, positional=("logits", "labels", "completion_mask")
    )
    if replaced is None:
        expected = (
            logits.double()
            .log_softmax(-1)[:, :-1]
            .gather(-1, labels[:, 1:, None])
            .squeeze(-1)
            .sum(1)
        )
        if args["average"]:
            expected = expected / (length - 1)
        assert result.dtype == expected_dtype(logits)
        assert _close(result, expected, result.dtype)


@settings(max_examples=100)
@given(st.data())
def test_ranking_functions_keep_the_contract(data):
    n = data.draw(st.integers(1, 5))
    kind = data.draw(
        st.sampled_from(
            ["ranked", "accuracy", "threshold", "ideal", "ideal_acc", "groups", "share"]
        )
    )
    two = {"chosen_logps": data.draw(logps(n)), "rejected_logps": data.draw(logps(n))}
    ref = {"ref_chosen_logps": two["chosen_logps"], "ref_rejected_logps": two["rejected_logps"]}
    alpha = st.one_of(
        st.floats(0.01, 0.99),
        st.lists(st.floats(0.01, 0.99), min_size=n, max_size=n).map(
            lambda v: torch.tensor(v, dtype=torch.float64)
        ),
    )
    bools = st.lists(st.booleans(), min_size=n, max_size=n).map(torch.tensor)
    if kind == "ranked":
        result, replaced = run(data, ranking.ranked_correctly, two, positional=tuple(two))
    elif kind == "accuracy":
        result, replaced = run(data, ranking.ranking_accuracy, two, positional=tuple(two))
        assert result is None or 0.0 <= result <= 1.0
    elif kind == "threshold":
        beta = data.draw(BETA)
        args = {**ref, "beta": beta}
        result, replaced = run(data, ranking.ranking_threshold, args, positional=tuple(ref))
    elif kind in ("ideal", "ideal_acc"):
        args = {**ref, "alpha": data.draw(alpha), "beta": data.draw(BETA)}
        fn = (
            ranking.idealized_ranked_correctly
            if kind == "ideal"
            else ranking.idealized_ranking_accuracy
        )
        result, replaced = run(data, fn, args, positional=(*ref, "alpha"))
    elif kind == "groups":  # a group with no pairs has a NaN flip rate, as documented
        args = {"ref_correct": data.draw(bools), "now_correct": data.draw(bools)}
        result, replaced = run(
            data, ranking.ranking_groups, args, positional=tuple(args), allow_nan=True
        )
    else:  # NaN only when no pair has gradient weight, as documented
        args = {
            "z": data.draw(logps(n)) + 100,
            "group": data.draw(bools),
            "gamma": data.draw(GAMMA),
            "detach_weight": data.draw(FLAG),
        }
        result, replaced = run(
            data, ranking.gradient_share, args, positional=("z", "group"), allow_nan=True
        )
        assert result is None or math.isnan(result) or 0.0 <= result <= 1.0
    if replaced is None and kind in ("ranked", "accuracy", "threshold"):
        chosen, rejected = two["chosen_logps"].double(), two["rejected_logps"].double()
        if kind == "ranked":
            expected = chosen >= rejected
        elif kind == "accuracy":
            expected = (chosen >= rejected).double().mean()
        else:
            expected = -F.logsigmoid(float(beta) * (rejected - chosen))
        assert _close(torch.as_tensor(result).double(), expected.double(), torch.float32)


@settings(max_examples=120)
@given(st.data())
def test_statistics_keep_the_contract(data):
    if data.draw(st.booleans()):
        args = {"wins": data.draw(st.integers(0, 60)), "losses": data.draw(st.integers(0, 60))}
        result, replaced = run(data, stats.sign_test, args, positional=("wins", "losses"))
        assert result is None or 0.0 <= result <= 1.0
        return
    n = data.draw(st.integers(2, 12))
    values = st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n)
    args = {
        "a": data.draw(values),
        "b": data.draw(values),
        "confidence": data.draw(st.floats(0.5, 0.99)),
        "resamples": data.draw(st.integers(100, 300)),
        "seed": data.draw(st.integers(0, 2**32)),
        "tie": data.draw(st.floats(0.0, 1e-6)),
    }
    result, replaced = run(data, stats.paired_comparison, args, positional=("a", "b"))
    if result is not None:
        assert result["wins"] + result["losses"] + result["ties"] == result["n"]
        assert min(result["wins"], result["losses"], result["ties"]) >= 0
        assert result["low"] <= result["high"]
    if replaced is None:
        mean = sum(x - y for x, y in zip(args["a"], args["b"], strict=True)) / n
        assert result["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-6)


@settings(max_examples=60)
@given(st.data())
def test_interval_and_holm_keep_the_contract(data):
    if data.draw(st.booleans()):
        m = data.draw(st.integers(1, 8))
        args = {"p_values": data.draw(st.lists(st.floats(0.0, 1.0), min_size=m, max_size=m))}
        adjusted, replaced = run(data, stats.holm, args, positional=("p_values",))
        if replaced is None:
            raw = args["p_values"]
            for a, p in zip(adjusted, raw, strict=True):
                assert p - 1e-15 <= a <= 1.0
            by_raw = sorted(range(m), key=lambda i: raw[i])
            assert [adjusted[i] for i in by_raw] == sorted(adjusted)
        return
    n = data.draw(st.integers(2, 12))
    args = {
        "values": data.draw(st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n)),
        "confidence": data.draw(st.floats(0.5, 0.99)),
        "resamples": data.draw(st.integers(100, 300)),
        "seed": data.draw(st.integers(0, 2**32)),
    }
    interval, replaced = run(
        data, stats.studentized_bootstrap_interval, args, positional=("values",)
    )
    if replaced is None:
        low, high = interval
        mean = sum(args["values"]) / n
        assert low <= mean + 1e-6 * (1 + abs(mean)) and mean - 1e-6 * (1 + abs(mean)) <= high


@settings(max_examples=40)
@given(st.data())
def test_plot_helpers_keep_the_contract(data):
    n = data.draw(st.integers(1, 6))
    z = data.draw(logps(n, dtypes=(torch.float32, torch.float64))) + 150.0
    group = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    kind = data.draw(st.sampled_from(["figure", "weights", "share", "flip", "training"]))
    try:
        if kind == "figure":
            args = {
                "ncols": data.draw(st.integers(1, 3)),
                "width": data.draw(st.floats(1, 12)),
                "height": data.draw(st.floats(1, 8)),
            }
            run(data, viz.new_figure, args)
        elif kind == "weights":
            args = {
                "z": z,
                "gamma": data.draw(GAMMA),
                "detach": data.draw(st.sampled_from([None, True, False])),
            }
            run(data, viz.loss_weights, args, positional=("z",))
        elif kind == "share":
            weight = viz.loss_weights(z - 150.0, gamma=0.5)["dpo"]
            args = {"weight": weight, "group": group}
            run(data, viz.weight_share, args, positional=("weight", "group"))
        elif kind == "flip":
            args = {"gamma": data.draw(GAMMA), "beta": data.draw(BETA)}
            run(data, viz.sign_flip_margin, args)
        else:
            result = _fake_result()
            args = {
                "runs": {"dpo": result},
                "metrics": data.draw(st.sampled_from([["loss"], ("loss", "rewards/accuracies")])),
            }
            run(data, viz.plot_training, args, positional=("runs",))
    finally:
        plt.close("all")


@settings(max_examples=40)
@given(st.data())
def test_explorer_and_panels_keep_the_contract(data):
    n = data.draw(st.integers(1, 5))
    z = data.draw(logps(n, dtypes=(torch.float32, torch.float64))) / 30.0 + 5.0
    misranked = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    gamma, detach = data.draw(GAMMA), data.draw(st.sampled_from([None, True, False]))
    kind = data.draw(
        st.sampled_from(
            [
                "weights",
                "histogram",
                "shares",
                "figure",
                "alt",
                "frames",
                "static",
                "live",
                "groups",
            ]
        )
    )
    viz.apply_style()
    _, ax = plt.subplots()
    try:
        if kind == "weights":
            args = {
                "ax": ax,
                "gamma": gamma,
                "detach": detach,
                "n_points": data.draw(st.integers(2, 50)),
            }
            run(data, viz.plot_gradient_weights, args)
        elif kind == "histogram":
            args = {
                "ax": ax,
                "z": z,
                "ref_misranked": misranked,
                "z_max": data.draw(st.floats(0.5, 10)),
            }
            run(data, viz.plot_margin_histogram, args)
        elif kind == "shares":
            args = {"ax": ax, "z": z, "ref_misranked": misranked, "gamma": gamma, "detach": detach}
            result, replaced = run(data, viz.plot_weight_shares, args)
            if replaced is None:
                assert all(0.0 <= share <= 1.0 for share in result.values())
        elif kind == "figure":
            args = {
                "gamma": gamma,
                "z": z,
                "ref_misranked": misranked,
                "step": data.draw(st.integers(0, 9)),
            }
            run(data, viz.explorer_figure, args)
        elif kind == "alt":
            args = {
                "gamma": gamma,
                "step": data.draw(st.integers(0, 9)),
                "z": z,
                "ref_misranked": misranked,
            }
            result, replaced = run(data, viz.explorer_frame_alt, args, positional=("gamma",))
            assert result is None or isinstance(result, str)
        elif kind in ("frames", "static", "live"):
            args = {"margins": {0: z, 4: -z}, "ref_misranked": misranked}
            if kind == "live":
                run(data, viz.gamma_explorer, args | {"gamma": gamma})
            else:
                first = data.draw(st.floats(0.0, 5.0))
                extra = {"gammas": [first, first + 1.0], "dpi": 10}
                fn = viz.explorer_frames if kind == "frames" else viz.gamma_explorer_static
                run(data, fn, args | extra, aliases={"gammas": ["gamma"]})
        else:
            metric = data.draw(st.sampled_from(["reward_accuracy", "ranking_accuracy", "margin"]))
            args = {
                "result": _fake_result(groups=True),
                "metric": metric,
                "split": "train",
                "ax": ax,
            }
            run(data, viz.plot_groups, args)
    finally:
        plt.close("all")


def _fake_result(groups: bool = False):
    from focalpo_mini.trainer import TrainConfig, TrainResult

    history = [{"step": s, "loss": 1.0 / s, "rewards/accuracies": 0.5} for s in (1, 2)]
    if groups:
        for row in history:
            for group in ("ref_correct", "ref_incorrect"):
                for metric in ("reward_accuracy", "ranking_accuracy", "margin"):
                    row[f"groups/{group}/{metric}"] = 0.5
    return TrainResult(history, [], [], TrainConfig(), {})
