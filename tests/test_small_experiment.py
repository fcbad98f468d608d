"""The committed results of chapter 7 are what scripts/run_small_experiment.py computes.

Re-runs a reduced configuration (seed 0: DPO and FocalPO with gamma 0.5, factor in the graph)
through the script's own functions and compares it with results/small_experiment.json. The runs
are seeded and use one thread, so on a CPU they repeat to rounding.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "small_experiment.json"


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "run_small_experiment", ROOT / "scripts" / "run_small_experiment.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def committed():
    return json.loads(RESULTS.read_text())


@pytest.fixture(scope="module")
def rerun(script, committed, tokenizer):
    cfg = script.ExperimentConfig(**committed["config"])
    threads = torch.get_num_threads()
    torch.set_num_threads(committed["machine"]["torch_threads"])
    try:
        reference = script.make_reference(tokenizer, 0, cfg)
        settings = [script.Setting("dpo"), script.Setting("focalpo", 0.5, False)]
        return {s.name: script.run_one(tokenizer, reference, 0, s, cfg) for s in settings}
    finally:
        torch.set_num_threads(threads)


def _committed_run(committed, setting):
    (run,) = [r for r in committed["runs"] if r["seed"] == 0 and r["setting"] == setting]
    return run


def _assert_close(got, expected, where):
    assert got.keys() == expected.keys(), where
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), f"{where}/{key}"
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{where}/{key}"


@pytest.mark.parametrize("setting", ["dpo", "focalpo_g0.5"])
def test_rerun_reproduces_committed_results(rerun, committed, setting):
    got, expected = rerun[setting], _committed_run(committed, setting)
    _assert_close(got["final"], expected["final"], f"{setting}/final")
    assert len(got["eval_history"]) == len(expected["eval_history"])
    for row_got, row_expected in zip(got["eval_history"], expected["eval_history"], strict=True):
        _assert_close(row_got, row_expected, f"{setting}/step {row_expected['step']}")


def test_committed_file_has_the_full_grid(committed, script):
    assert len(committed["seeds"]) >= 3
    expected = [s.name for s in script.settings_grid(committed["gammas"])]
    assert committed["settings"] == expected
    assert {(r["seed"], r["setting"]) for r in committed["runs"]} == {
        (seed, name) for seed in committed["seeds"] for name in expected
    }
    assert [row["setting"] for row in committed["summary"]] == expected


def test_summary_is_the_mean_over_seeds(committed):
    for row in committed["summary"]:
        values = [
            r["final"]["ranking_accuracy"]
            for r in committed["runs"]
            if r["setting"] == row["setting"]
        ]
        assert row["ranking_accuracy"]["mean"] == pytest.approx(sum(values) / len(values))
        assert row["ranking_accuracy"]["min"] == min(values)
