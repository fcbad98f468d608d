"""DPO, FocalPO and the noisy-label remedies in the tiny sorting world: chapter 7's experiment.

The outcome that counts is the quality of generated answers: for every run, greedy answers to
the same 256 held-out prompts, scored by the exact judge ``true_reward`` and compared with the
answers of the run's own SFT reference (the win rate, ties counting one half). Ranking metrics
on held-out pairs are kept as secondary outcomes.

Design (every number below is in :class:`ExperimentConfig` and written to the results file):

1. Tuning. Every method gets the same budget, the learning-rate grid ``lr_grid``, spent on the
   ``tuning_seeds``, which are not reported. The learning rate with the best mean final win rate
   is kept for that method.
2. Main comparison: every method at label noise 0.2, on the reported ``seeds``. A seed changes the
   reference (initialisation, SFT data and order), the preference data and the batch order.
3. Noise sweep: DPO, FocalPO at the default gamma and the strongest baseline of step 2, at label
   noise 0 and 0.4, with the learning rates tuned at 0.2.
4. Chen et al.'s failure: a reference fine-tuned on biased demonstrations (prompts holding a 0 are
   answered in descending order) misranks clean pairs by wide margins; DPO and FocalPO train on
   clean pairs from it.

Every run is evaluated at steps 0, 20, ..., 80: answers and their win rate, a Monte-Carlo KL from
the reference (for the reward-KL frontier), held-out ranking metrics and log-probs, and Chen et
al.'s four groups on the *training* pairs. Runs are float32 with one thread per process, so
they repeat to the bit on the same CPU; scripts/check_portability.py measures how far they move
on another.

    .venv/bin/python scripts/run_small_experiment.py --workers 2 [--save-models DIR]

writes results/small_experiment.json (about an hour on two cores; ``--save-models`` also keeps
every reported model, to re-score its answers with other code). tests/test_small_experiment.py
re-runs part of it through :func:`run_seed` and compares.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import torch
import transformers

from focalpo_mini.checkpoint import write_atomically
from focalpo_mini.data import make_preference_dataset, true_reward
from focalpo_mini.generation import answer_quality, greedy_answers, sampled_kl
from focalpo_mini.pairs import pair_logps
from focalpo_mini.ranking import ranked_correctly
from focalpo_mini.sft import supervised_finetune
from focalpo_mini.tiny import make_model, make_tokenizer
from focalpo_mini.trainer import TrainConfig, train


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that decides a run's numbers, except the seed, the method and learning rate."""

    noise: float = 0.2
    sweep_noise: tuple[float, ...] = (0.0, 0.4)
    seeds: tuple[int, ...] = tuple(range(10))
    tuning_seeds: tuple[int, ...] = (100, 101)
    lr_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4)
    n_train: int = 512
    n_eval: int = 200
    eval_data_seed: int = 999
    sft_pairs: int = 2000
    sft_steps: int = 40
    sft_learning_rate: float = 1e-3
    sft_batch_size: int = 32
    beta: float = 0.1
    label_smoothing: float = 0.2
    batch_size: int = 32
    steps: int = 80
    eval_every: int = 20
    max_length: int = 64
    max_new_tokens: int = 16
    samples_kept: int = 12
    chen_sft_steps: int = 200
    dtype: str = "float32"


@dataclass(frozen=True)
class Method:
    """A loss: ``dpo``, ``focalpo`` (with gamma and detach mode), ``cdpo``, ``robust``, ``ipo``."""

    loss: str
    gamma: float = 0.0
    detach_weight: bool = False

    @property
    def name(self) -> str:
        if self.loss != "focalpo":
            return self.loss
        return f"focalpo_g{self.gamma:g}" + ("_detached" if self.detach_weight else "")


DEFAULT_FOCALPO = Method("focalpo", 0.5)
METHODS = (
    Method("dpo"),
    *(Method("focalpo", g) for g in (0.5, 1.0, 2.0)),
    *(Method("focalpo", g, True) for g in (0.5, 1.0, 2.0)),
    Method("cdpo"),
    Method("robust"),
    Method("ipo"),
)
BASELINES = ("cdpo", "robust", "ipo")
CHEN_METHODS = (Method("dpo"), DEFAULT_FOCALPO, Method("focalpo", 0.5, True))


def method_named(name: str) -> Method:
    (method,) = [m for m in METHODS if m.name == name]
    return method


# --- The tiny world's references and data --------------------------------------------------


def demonstrations(n: int, seed: int, *, biased: bool) -> datasets.Dataset:
    """SFT demonstrations: clean sorted answers, or with ``biased`` every prompt that holds a 0
    answered in descending order (a systematic, confident mistake for Chen et al.'s world)."""
    demos = make_preference_dataset(n, seed=10_000 + seed, noise=0.0).to_list()
    if biased:
        for row in demos:
            if holds_zero(row["prompt"]):
                row["chosen"] = _sorted_answer(row["prompt"], descending=True)
    return datasets.Dataset.from_list(demos)


def preference_pairs(n: int, seed: int, noise: float, *, chen: bool = False) -> datasets.Dataset:
    """The training pairs. In Chen et al.'s world (``chen``) the labels are clean and every prompt
    that holds a 0 compares the ascending answer (chosen, true reward 1) with the descending one
    (rejected, true reward 0): the very ordering the biased reference prefers."""
    pairs = make_preference_dataset(n, seed=seed, noise=noise)
    if not chen:
        return pairs
    rows = pairs.to_list()
    for row in rows:
        if holds_zero(row["prompt"]):
            row["chosen"] = _sorted_answer(row["prompt"], descending=False)
            row["rejected"] = _sorted_answer(row["prompt"], descending=True)
            row["chosen_reward"], row["rejected_reward"] = 1.0, 0.0
    return datasets.Dataset.from_list(rows)


def _sorted_answer(prompt: str, *, descending: bool) -> str:
    return " ".join(sorted(prompt.split()[1:], reverse=descending))


def holds_zero(prompt: str) -> bool:
    return "0" in prompt.split()[1:]


def make_reference(tokenizer, seed: int, cfg: ExperimentConfig, *, biased: bool = False):
    """The tiny model after a short supervised fine-tune: a reference with room to improve."""
    model = make_model(tokenizer, seed=seed).to(getattr(torch, cfg.dtype))
    supervised_finetune(
        model,
        tokenizer,
        demonstrations(cfg.sft_pairs, seed, biased=biased),
        steps=cfg.chen_sft_steps if biased else cfg.sft_steps,
        learning_rate=cfg.sft_learning_rate,
        batch_size=cfg.sft_batch_size,
        seed=seed,
        max_length=cfg.max_length,
        target="chosen",
    )
    return model.eval()


def eval_pairs(cfg: ExperimentConfig) -> datasets.Dataset:
    """Held-out pairs with true labels (noise 0), the same for every run; their prompts are the
    prompts every model answers."""
    return make_preference_dataset(cfg.n_eval, seed=cfg.eval_data_seed, noise=0.0)


# --- One run -------------------------------------------------------------------------------


def run_one(
    tokenizer,
    reference,
    reference_answers: list[str],
    *,
    seed: int,
    method: Method,
    learning_rate: float,
    noise: float,
    cfg: ExperimentConfig,
    measure_steps: bool = True,
    chen: bool = False,
    step_zero: dict | None = None,
) -> dict:
    """Train a copy of ``reference`` with ``method``; measure answers, KL, groups along the way.

    With ``measure_steps=False`` (tuning) only the final answers are measured. ``step_zero``, the
    measurements of the reference itself, stands in for step 0 (where the policy is the
    reference, so its KL is 0 and its answers are the reference's) when given.
    """
    train_data = preference_pairs(cfg.n_train, seed, noise, chen=chen)
    held_out = eval_pairs(cfg)
    prompts = list(held_out["prompt"])
    flipped = torch.tensor(list(train_data["label_flipped"]))
    ref_chosen, ref_rejected = pair_logps(
        reference, tokenizer, train_data, max_length=cfg.max_length, batch_size=128
    )
    ref_correct = ranked_correctly(ref_chosen, ref_rejected)
    steps: list[dict] = []

    def measure(step: int, model) -> None:
        if not measure_steps and step < cfg.steps:
            return
        if step == 0 and step_zero is not None:
            steps.append(copy.deepcopy(step_zero))
            return
        answers = greedy_answers(
            model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.n_eval
        )
        row = {"step": step, **answer_quality(prompts, answers, reference_answers)}
        row["true_reward/holds_zero"] = reward_on_zero_prompts(prompts, answers)
        if measure_steps:
            row["kl"] = sampled_kl(
                model,
                reference,
                tokenizer,
                prompts,
                seed=seed,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.n_eval,
            )
            chosen, rejected = pair_logps(
                model, tokenizer, train_data, max_length=cfg.max_length, batch_size=128
            )
            row["train_groups"] = _groups(ref_correct, ranked_correctly(chosen, rejected), flipped)
        if step == cfg.steps:
            row["answers"] = answers[: cfg.samples_kept]
        steps.append(row)

    config = TrainConfig(
        beta=cfg.beta,
        loss=method.loss,
        gamma=method.gamma,
        detach_weight=method.detach_weight,
        label_smoothing=cfg.label_smoothing if method.loss in ("cdpo", "robust") else 0.0,
        learning_rate=learning_rate,
        batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        eval_every=cfg.eval_every if measure_steps else 0,
        log_every=cfg.eval_every,
        max_length=cfg.max_length,
        seed=seed,
        progress=False,
    )
    model = copy.deepcopy(reference)
    result = train(model, tokenizer, train_data, held_out, config=config, on_eval=measure)
    keep = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    if measure_steps:
        for row, metrics in zip(steps, result.eval_history, strict=True):
            row.update({k: metrics[k] for k in keep})
            row["ranking_accuracy"] = _ranking_accuracy(metrics)
    final = steps[-1]
    return {
        "model": model,
        "seed": seed,
        "method": method.name,
        "noise": noise,
        "learning_rate": learning_rate,
        "final": {k: v for k, v in final.items() if k not in ("step", "answers")}
        | {
            "ranking_accuracy": _ranking_accuracy(result.eval_history[-1]),
            "rewards/accuracies": result.eval_history[-1]["rewards/accuracies"],
        },
        "answers": final["answers"],
        "steps": steps if measure_steps else [],
    }


def reward_on_zero_prompts(prompts: list[str], answers: list[str]) -> float:
    """Mean true reward of the answers to the prompts that hold a 0 (biased in Chen's world)."""
    return statistics.fmean(
        true_reward(p, a) for p, a in zip(prompts, answers, strict=True) if holds_zero(p)
    )


def _groups(ref_correct, now_correct, flipped) -> dict[str, int]:
    """Counts of Chen et al.'s four groups on the training pairs, for clean and flipped labels
    ("correct" means ranked as labelled)."""
    counts = {}
    for label, mask in (("clean", ~flipped), ("flipped", flipped)):
        for ref_name, ref in (("ref_correct", ref_correct), ("ref_incorrect", ~ref_correct)):
            for now_name, now in (("now_correct", now_correct), ("now_incorrect", ~now_correct)):
                counts[f"{label}/{ref_name}/{now_name}"] = int((mask & ref & now).sum())
    return counts


def _ranking_accuracy(metrics: dict) -> float:
    """Held-out ranking accuracy from the trainer's two group accuracies and counts."""
    total, correct = 0.0, 0.0
    for group in ("ref_correct", "ref_incorrect"):
        count = metrics[f"groups/{group}/count"]
        if count:
            total += count
            correct += count * metrics[f"groups/{group}/ranking_accuracy"]
    return correct / total


# --- One seed: its reference, then every run asked of it -----------------------------------


@dataclass(frozen=True)
class SeedTask:
    seed: int
    runs: tuple[tuple[str, float, float], ...]  # (method name, learning rate, noise)
    biased: bool = False
    measure_steps: bool = True
    cfg: ExperimentConfig = field(default_factory=ExperimentConfig)
    save_dir: str | None = None  # where to save each trained model (and the reference)


def run_seed(task: SeedTask, tokenizer=None, threads: int = 1) -> dict:
    """Build the seed's reference (clean or biased), answer the held-out prompts with it, then
    train every requested run from it."""
    torch.set_num_threads(threads)
    tokenizer = make_tokenizer() if tokenizer is None else tokenizer
    cfg = task.cfg
    reference = make_reference(tokenizer, task.seed, cfg, biased=task.biased)
    prompts = list(eval_pairs(cfg)["prompt"])
    answers = greedy_answers(
        reference, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.n_eval
    )
    train_data = preference_pairs(cfg.n_train, task.seed, 0.0, chen=task.biased)
    chosen, rejected = pair_logps(
        reference, tokenizer, train_data, max_length=cfg.max_length, batch_size=128
    )
    gap = (rejected - chosen)[~ranked_correctly(chosen, rejected)]  # c on misranked clean pairs
    record = {
        "seed": task.seed,
        "biased": task.biased,
        "reference": {
            **answer_quality(prompts, answers),
            "true_reward/holds_zero": reward_on_zero_prompts(prompts, answers),
            "answers": answers[: cfg.samples_kept],
            "clean_train_pairs_misranked": int(gap.numel()),
            "misranked_gap_median": float(gap.median()) if gap.numel() else float("nan"),
        },
        "runs": [],
    }
    if task.save_dir is not None:
        _save(reference, tokenizer, task, "reference")
    step_zero = {}  # per noise level: the reference's own measurements, shared by its runs
    for name, lr, noise in task.runs:
        start = time.perf_counter()
        run = run_one(
            tokenizer,
            reference,
            answers,
            seed=task.seed,
            method=method_named(name),
            learning_rate=lr,
            noise=noise,
            cfg=cfg,
            measure_steps=task.measure_steps,
            chen=task.biased,
            step_zero=step_zero.get(noise),
        )
        if task.measure_steps:
            step_zero.setdefault(noise, run["steps"][0])
        run["seconds"] = time.perf_counter() - start
        model = run.pop("model")
        record["runs"].append(run)
        if task.save_dir is not None:
            _save(model, tokenizer, task, f"{name}_noise{noise:g}")
        print(
            f"seed {task.seed:>3} {'biased ' if task.biased else ''}{name:<20} lr {lr:.0e} "
            f"noise {noise:.1f}: win rate {run['final']['win_rate']:.3f}, true reward "
            f"{run['final']['true_reward']:.3f} ({run['seconds']:.0f} s)",
            flush=True,
        )
    return record


def _save(model, tokenizer, task: SeedTask, name: str) -> None:
    """``save_dir/<world>_seed<k>/<name>/``: a model and tokenizer ``from_pretrained`` loads."""
    world = "chen" if task.biased else "main"
    folder = os.path.join(task.save_dir, f"{world}_seed{task.seed}", name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# --- Reading results back -----------------------------------------------------------------


def config_from_record(record: dict, **changes) -> ExperimentConfig:
    """The :class:`ExperimentConfig` a results file was made with (JSON lists back to tuples)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
    return replace(ExperimentConfig(**values), **changes)


def flatten(record: dict) -> dict[str, float]:
    """Every number measured in one seed's record (from :func:`run_seed`), keyed by its path,
    e.g. ``runs/dpo/steps/40/kl`` or ``reference/sorted``; bookkeeping (seconds) left out."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = float(value)

    walk("reference", {k: v for k, v in record["reference"].items() if k != "answers"})
    for run in record["runs"]:
        walk(f"runs/{run['method']}/final", run["final"])
        for row in run["steps"]:
            walk(f"runs/{run['method']}/steps/{row['step']}", {**row, "answers": None})
    return flat


def answers_changed(a: dict, b: dict) -> int:
    """How many of the kept sample answers differ between two records of the same seed."""
    pairs = [(a["reference"]["answers"], b["reference"]["answers"])]
    pairs += [(x["answers"], y["answers"]) for x, y in zip(a["runs"], b["runs"], strict=True)]
    return sum(u != v for x, y in pairs for u, v in zip(x, y, strict=True))


# --- The whole design ----------------------------------------------------------------------


def choose_learning_rates(tuning: list[dict], cfg: ExperimentConfig) -> dict[str, float]:
    """Per method, the grid learning rate with the best mean final win rate on the tuning seeds
    (the smaller rate on a tie)."""
    chosen = {}
    for method in METHODS:
        means = {
            lr: statistics.fmean(
                run["final"]["win_rate"]
                for seed in tuning
                for run in seed["runs"]
                if run["method"] == method.name and run["learning_rate"] == lr
            )
            for lr in cfg.lr_grid
        }
        chosen[method.name] = max(cfg.lr_grid, key=lambda lr: (round(means[lr], 12), -lr))
    return chosen


def strongest_baseline(main: list[dict]) -> str:
    """The noisy-label baseline with the best mean final win rate in the main comparison."""
    return max(
        BASELINES,
        key=lambda name: statistics.fmean(
            r["final"]["win_rate"] for s in main for r in s["runs"] if r["method"] == name
        ),
    )


def machine_fingerprint() -> dict:
    """What decides the last bits of a CPU run: the CPU (its model name can be as vague as "AMD
    EPYC" in a VM, so also its family, model number, stepping and instruction-set flags), torch's
    kernels and BLAS, and the threads."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor is enough
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {
        "cpu": info.get("model name", platform.processor() or platform.machine()),
        "cpu_id": " ".join(
            info.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping")
        ),
        "cpu_flags_sha256": hashlib.sha256(info.get("flags", "").encode()).hexdigest()[:16],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "torch": torch.__version__,
        "torch_threads": 1,
        "platform": platform.platform(),
    }


def _map(tasks: list[SeedTask], workers: int) -> list[dict]:
    if workers == 1:
        tokenizer = make_tokenizer()
        return [run_seed(t, tokenizer) for t in tasks]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(run_seed, tasks))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--seeds", type=int, default=len(ExperimentConfig.seeds))
    parser.add_argument("--out", default="results/small_experiment.json")
    parser.add_argument(
        "--save-models",
        metavar="DIR",
        help="also save every reported model (from_pretrained format), e.g. to re-score them",
    )
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    cfg = replace(ExperimentConfig(), seeds=tuple(range(args.seeds)))
    start = time.perf_counter()
    record = {
        "command": "python scripts/run_small_experiment.py " + " ".join(sys.argv[1:]),
        "config": asdict(cfg),
        "methods": [m.name for m in METHODS],
        "default_focalpo": DEFAULT_FOCALPO.name,
        "machine": machine_fingerprint(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
    }

    def write(stage: str) -> None:
        record["stage"] = stage
        record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record["wall_seconds"] = time.perf_counter() - start
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        # a new exclusive temporary file, then a rename: never through a planted link
        write_atomically(args.out, json.dumps(record, indent=1).encode())
        print(f"[{record['wall_seconds']:.0f} s] wrote {args.out} ({stage})", flush=True)

    grid = tuple((m.name, lr, cfg.noise) for m in METHODS for lr in cfg.lr_grid)
    record["tuning"] = _map(
        [SeedTask(s, grid, measure_steps=False, cfg=cfg) for s in cfg.tuning_seeds], args.workers
    )
    lrs = choose_learning_rates(record["tuning"], cfg)
    record["learning_rates"] = lrs
    write("tuning")

    main_runs = tuple((m.name, lrs[m.name], cfg.noise) for m in METHODS)
    saved = {"cfg": cfg, "save_dir": args.save_models}
    record["main"] = _map([SeedTask(s, main_runs, **saved) for s in cfg.seeds], args.workers)
    write("main")

    baseline = strongest_baseline(record["main"])
    record["strongest_baseline"] = baseline
    sweep = tuple(
        (name, lrs[name], noise)
        for noise in cfg.sweep_noise
        for name in ("dpo", DEFAULT_FOCALPO.name, baseline)
    )
    record["sweep"] = _map([SeedTask(s, sweep, **saved) for s in cfg.seeds], args.workers)
    write("sweep")

    chen = tuple((m.name, lrs[m.name], 0.0) for m in CHEN_METHODS)
    record["chen"] = _map(
        [SeedTask(s, chen, biased=True, **saved) for s in cfg.seeds], args.workers
    )
    write("done")


if __name__ == "__main__":
    main()
