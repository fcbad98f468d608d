"""Chapter 7's committed results are what scripts/run_small_experiment.py computes, on any CPU.

The test re-runs seed 0 of the main comparison (the reference, DPO and FocalPO at the default
gamma) through the script's own :func:`run_seed` and compares every number it measures with
results/small_experiment.json:

- on the machine that made the file (same CPU name, family, model number, stepping and flags,
  torch CPU capability and torch version; one thread), a seeded float32 run repeats to the bit,
  so every number must agree to 1e-9 and every answer must be the same;
- on another machine the last bits of the float32 sums move, and through training so do the
  numbers. Each number may then move by three times the largest movement that
  scripts/check_portability.py measured (results/portability.json: kernels restricted to AVX2 or
  plain code, two threads, float64 instead of float32), and at least by the change one flipped
  decision makes (two or three answers or pairs; one sampled answer of the KL estimate; 1e-5
  relative for a continuous quantity). Measured here, nothing but log-probs and losses moved,
  and those by less than 1e-4 nats.

That tolerance still catches a real change: ``test_a_changed_beta_is_caught`` re-runs DPO with
beta 0.11 instead of 0.1 and requires the comparison to fail.
"""

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "small_experiment.json"
PORTABILITY = ROOT / "results" / "portability.json"
METHODS = ("dpo", "focalpo_g0.5")
FRACTIONS = ("true_reward", "sorted", "invalid", "win_rate", "ranking_accuracy", "accuracies")


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
def cfg(script, committed):
    return script.config_from_record(committed["config"])


def _committed_seed(committed, seed=0, stage="main"):
    (record,) = [r for r in committed[stage] if r["seed"] == seed]
    return record


def _rerun(script, cfg, tokenizer, runs):
    return script.run_seed(script.SeedTask(0, runs, cfg=cfg), tokenizer, threads=1)


@pytest.fixture(scope="module")
def rerun(script, committed, cfg, tokenizer):
    runs = tuple((m, committed["learning_rates"][m], cfg.noise) for m in METHODS)
    return _rerun(script, cfg, tokenizer, runs)


SAME_MACHINE_KEYS = ("cpu", "cpu_id", "cpu_flags_sha256", "torch_cpu_capability", "torch")


def _same_machine(script, committed) -> bool:
    """The file was made on this CPU model (name, family, model number, stepping, flags) with
    this torch. A file that does not record all of these counts as made elsewhere."""
    here, there = script.machine_fingerprint(), committed["machine"]
    return all(k in there and here[k] == there[k] for k in SAME_MACHINE_KEYS)


def _tolerance(key: str, value: float, cfg, largest: dict[str, float]) -> float:
    """Three times the measured movement, and at least the smallest change a flipped decision
    makes: on another CPU a greedy answer at a near-tie, or one token of the KL estimate's
    samples, can come out differently even when every sum moves by 1e-5."""
    if "train_groups" in key or key.endswith("misranked"):
        floor = 2.0  # counts: two pairs
    elif key.endswith("/kl"):
        floor = 20.0 / cfg.n_eval  # one of the sampled answers changing its log-ratio by 20 nats
    elif key.split("/")[-1] in FRACTIONS or "true_reward" in key:
        floor = 5.0 / cfg.n_eval  # two or three answers or held-out pairs
    else:
        floor = 1e-5 * max(1.0, abs(value))  # continuous: the measured movements are below this
    return max(3.0 * largest.get(key, 0.0), floor)


def mismatches(got: dict, expected: dict, tolerance) -> list[str]:
    """Keys (with values) of ``expected`` that ``got`` lacks or misses by more than tolerance."""
    wrong = []
    for key, value in expected.items():
        if key not in got:
            wrong.append(f"{key}: missing")
        elif math.isnan(value) != math.isnan(got[key]):
            wrong.append(f"{key}: {got[key]} against {value}")
        elif not math.isnan(value) and abs(got[key] - value) > tolerance(key, value):
            wrong.append(f"{key}: {got[key]} against {value}")
    return wrong


def _cross_machine(cfg):
    """The tolerance ``(key, value) -> allowed |difference|`` for a run on another machine."""
    largest = json.loads(PORTABILITY.read_text())["largest"]
    return lambda key, value: _tolerance(key, value, cfg, largest)


def _comparison(script, committed, cfg):
    if _same_machine(script, committed):
        return lambda key, value: 1e-9 * max(1.0, abs(value)), True
    return _cross_machine(cfg), False


def _expected(script, committed, methods):
    record = _committed_seed(committed)
    record = {**record, "runs": [r for r in record["runs"] if r["method"] in methods]}
    return record, script.flatten(record)


def test_rerun_reproduces_the_committed_numbers(script, committed, cfg, rerun):
    record, expected = _expected(script, committed, METHODS)
    tolerance, same_machine = _comparison(script, committed, cfg)
    assert [r["method"] for r in rerun["runs"]] == list(METHODS)
    assert len(expected) > 150  # every step's answers, KL, groups and ranking metrics
    assert mismatches(script.flatten(rerun), expected, tolerance) == []
    if same_machine:
        assert script.answers_changed(rerun, record) == 0


def test_a_changed_beta_is_caught(script, committed, cfg, tokenizer):
    """The tolerance is not so wide that a real change passes: beta 0.11 instead of 0.1."""
    runs = (("dpo", committed["learning_rates"]["dpo"], cfg.noise),)
    changed = _rerun(script, replace(cfg, beta=0.11), tokenizer, runs)
    _, expected = _expected(script, committed, ("dpo",))
    runs_only = {k: v for k, v in expected.items() if k.startswith("runs/")}
    assert len(mismatches(script.flatten(changed), runs_only, _cross_machine(cfg))) > 10


def test_portability_file_measured_this_experiment(committed, script):
    portability = json.loads(PORTABILITY.read_text())
    assert set(portability["variants"]) >= {"unchanged", "float64", "two_threads"}
    _, expected = _expected(script, committed, METHODS)
    # the unchanged variant is the committed run itself (it was measured on the same machine)
    assert set(portability["largest"]) == set(expected)
    assert all(v == 0.0 for v in portability["movement"]["unchanged"].values())


def test_committed_file_has_the_full_design(committed, script, cfg):
    assert committed["stage"] == "done"
    assert len(cfg.seeds) >= 10 and not set(cfg.seeds) & set(cfg.tuning_seeds)
    names = [m.name for m in script.METHODS]
    assert committed["methods"] == names
    for stage, seeds in (("tuning", cfg.tuning_seeds), ("main", cfg.seeds)):
        assert sorted(r["seed"] for r in committed[stage]) == sorted(seeds)
    for record in committed["tuning"]:
        got = {(r["method"], r["learning_rate"]) for r in record["runs"]}
        assert got == {(m, lr) for m in names for lr in cfg.lr_grid}
    for record in committed["main"]:
        assert [r["method"] for r in record["runs"]] == names
        for run in record["runs"]:
            assert len(run["steps"]) == cfg.steps // cfg.eval_every + 1
            assert run["learning_rate"] == committed["learning_rates"][run["method"]]
    for stage in ("sweep", "chen"):
        assert sorted(r["seed"] for r in committed[stage]) == sorted(cfg.seeds)


def test_choices_follow_from_the_recorded_runs(committed, script, cfg):
    """The learning rates and the strongest baseline are what the tuning and main runs imply."""
    assert script.choose_learning_rates(committed["tuning"], cfg) == committed["learning_rates"]
    assert script.strongest_baseline(committed["main"]) == committed["strongest_baseline"]
    sweep_methods = {r["method"] for s in committed["sweep"] for r in s["runs"]}
    assert sweep_methods == {"dpo", committed["default_focalpo"], committed["strongest_baseline"]}
    assert {r["noise"] for s in committed["sweep"] for r in s["runs"]} == set(cfg.sweep_noise)


def test_saved_models_load_and_give_the_recorded_answers(script, cfg, tokenizer, tmp_path):
    """--save-models: what is saved is the model that gave the recorded answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from focalpo_mini.generation import greedy_answers

    small = replace(cfg, steps=2, eval_every=1, n_train=32, n_eval=16, sft_steps=2)
    task = script.SeedTask(3, (("dpo", 1e-3, 0.2),), cfg=small, save_dir=str(tmp_path))
    record = script.run_seed(task, tokenizer)
    folder = tmp_path / "main_seed3" / "dpo_noise0.2"
    model = AutoModelForCausalLM.from_pretrained(folder)
    loaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = list(script.eval_pairs(small)["prompt"])[: small.samples_kept]
    assert greedy_answers(model, loaded_tokenizer, prompts) == record["runs"][0]["answers"]
    assert (tmp_path / "main_seed3" / "reference" / "config.json").exists()
