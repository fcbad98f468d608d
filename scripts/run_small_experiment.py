"""DPO against FocalPO on the tiny sorting world with label noise: the book's chapter 7 experiment.

For each seed: a supervised fine-tune of the tiny model on clean demonstrations gives the
reference; from that same reference, DPO and FocalPO (every gamma, factor in the graph and
detached) are trained on noisy preference pairs and evaluated on held-out pairs whose labels are
the ground truth. The results go to one JSON file that the chapter reads:

    .venv/bin/python scripts/run_small_experiment.py --out results/small_experiment.json

Runs are seeded and deterministic on a CPU, so tests/test_small_experiment.py re-runs a reduced
configuration through :func:`run_one` and compares it with the committed file.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import torch
import transformers

from focalpo_mini.data import make_preference_dataset
from focalpo_mini.pairs import pair_logps
from focalpo_mini.ranking import ranked_correctly
from focalpo_mini.sft import supervised_finetune
from focalpo_mini.tiny import make_model, make_tokenizer
from focalpo_mini.trainer import TrainConfig, train


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that decides a run's numbers (the seed and the loss setting come per run)."""

    noise: float = 0.2
    n_train: int = 512
    n_eval: int = 512
    eval_data_seed: int = 999
    sft_pairs: int = 2000
    sft_steps: int = 150
    sft_learning_rate: float = 1e-3
    sft_batch_size: int = 32
    beta: float = 0.1
    learning_rate: float = 1e-4
    batch_size: int = 32
    steps: int = 100
    eval_every: int = 20
    max_length: int = 64


@dataclass(frozen=True)
class Setting:
    """One loss: ``dpo``, or ``focalpo`` with its gamma and detach mode."""

    loss: str
    gamma: float = 0.0
    detach_weight: bool = False

    @property
    def name(self) -> str:
        if self.loss == "dpo":
            return "dpo"
        return f"focalpo_g{self.gamma:g}" + ("_detached" if self.detach_weight else "")


def settings_grid(gammas: list[float]) -> list[Setting]:
    """DPO, then FocalPO with each gamma, factor in the graph, then detached."""
    grid = [Setting("dpo")]
    for detach in (False, True):
        grid += [Setting("focalpo", gamma, detach) for gamma in gammas]
    return grid


def make_reference(tokenizer, seed: int, cfg: ExperimentConfig):
    """The tiny model after a brief supervised fine-tune on clean chosen completions."""
    demos = make_preference_dataset(cfg.sft_pairs, seed=10_000 + seed, noise=0.0)
    model = make_model(tokenizer, seed=seed)
    supervised_finetune(
        model,
        tokenizer,
        demos,
        steps=cfg.sft_steps,
        learning_rate=cfg.sft_learning_rate,
        batch_size=cfg.sft_batch_size,
        seed=seed,
        max_length=cfg.max_length,
        target="chosen",
    )
    return model


def datasets_for(seed: int, cfg: ExperimentConfig):
    """Noisy training pairs (per seed) and clean held-out pairs (the same for every seed)."""
    train_data = make_preference_dataset(cfg.n_train, seed=seed, noise=cfg.noise)
    eval_data = make_preference_dataset(cfg.n_eval, seed=cfg.eval_data_seed, noise=0.0)
    return train_data, eval_data


def run_one(tokenizer, reference, seed: int, setting: Setting, cfg: ExperimentConfig) -> dict:
    """Train one copy of ``reference`` with ``setting``; return its metrics and histories.

    Held-out labels are the ground truth (noise 0), so reward and ranking accuracy there are
    accuracies against the truth. On the training pairs, ``train/noisy_followed`` is the fraction
    of label-flipped pairs whose wrong label the policy ends up following (ranking the truly
    worse completion first), and ``train/clean_ranking_accuracy`` the ranking accuracy on the rest.
    """
    train_data, eval_data = datasets_for(seed, cfg)
    model = copy.deepcopy(reference)
    config = TrainConfig(
        beta=cfg.beta,
        loss=setting.loss,
        gamma=setting.gamma,
        detach_weight=setting.detach_weight,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        eval_every=cfg.eval_every,
        log_every=cfg.eval_every,
        max_length=cfg.max_length,
        seed=seed,
        progress=False,
    )
    result = train(model, tokenizer, train_data, eval_data, config=config)
    final = result.eval_history[-1]
    chosen, rejected = pair_logps(model, tokenizer, train_data, max_length=cfg.max_length)
    follows_label = ranked_correctly(chosen, rejected)
    flipped = torch.tensor(list(train_data["label_flipped"]))
    keep = ("rewards/accuracies", "rewards/margins", "loss")
    groups = [k for k in final if k.startswith("groups/")]
    return {
        "seed": seed,
        "setting": setting.name,
        "loss": setting.loss,
        "gamma": setting.gamma,
        "detach_weight": setting.detach_weight,
        "final": {
            "reward_accuracy": final["rewards/accuracies"],
            "ranking_accuracy": _ranking_accuracy(final),
            "margin": final["rewards/margins"],
            **{k: final[k] for k in groups},
            "train/noisy_followed": follows_label[flipped].float().mean().item(),
            "train/clean_ranking_accuracy": follows_label[~flipped].float().mean().item(),
        },
        "eval_history": [
            {"step": r["step"], **{k: r[k] for k in (*keep, *groups)}} for r in result.eval_history
        ],
        "train_seconds": result.train_seconds,
    }


def _ranking_accuracy(metrics: dict) -> float:
    """Overall ranking accuracy from the two groups' accuracies and counts."""
    total, correct = 0.0, 0.0
    for group in ("ref_correct", "ref_incorrect"):
        count = metrics[f"groups/{group}/count"]
        if count:
            total += count
            correct += count * metrics[f"groups/{group}/ranking_accuracy"]
    return correct / total


def summarise(runs: list[dict]) -> list[dict]:
    """Mean, min and max over seeds of the final metrics, one row per setting, in run order."""
    rows = []
    for name in dict.fromkeys(r["setting"] for r in runs):
        finals = [r["final"] for r in runs if r["setting"] == name]
        row = {"setting": name, "seeds": len(finals)}
        for key in finals[0]:
            values = [f[key] for f in finals]
            row[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    columns = (
        ("reward_accuracy", "reward acc"),
        ("ranking_accuracy", "ranking acc"),
        ("groups/ref_incorrect/ranking_accuracy", "ref-wrong rank acc"),
        ("train/noisy_followed", "noisy followed"),
        ("margin", "margin"),
    )
    print(f"{'setting':<26}" + "".join(f"{title:>22}" for _, title in columns))
    for row in rows:
        cells = "".join(
            f"{row[k]['mean']:>10.3f} [{row[k]['min']:.2f},{row[k]['max']:.2f}]" for k, _ in columns
        )
        print(f"{row['setting']:<26}{cells}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=ExperimentConfig.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default="results/small_experiment.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ExperimentConfig(steps=args.steps)
    tokenizer = make_tokenizer()
    grid = settings_grid(args.gammas)
    runs, start = [], time.perf_counter()
    for seed in args.seeds:
        reference = make_reference(tokenizer, seed, cfg)
        for setting in grid:
            run = run_one(tokenizer, reference, seed, setting, cfg)
            runs.append(run)
            print(
                f"[{time.perf_counter() - start:6.0f} s] seed {seed} {setting.name:<24} "
                f"reward acc {run['final']['reward_accuracy']:.3f}  "
                f"ranking acc {run['final']['ranking_accuracy']:.3f}",
                flush=True,
            )
    summary = summarise(runs)
    _print_table(summary)
    record = {
        "command": "python scripts/run_small_experiment.py " + " ".join(sys.argv[1:]),
        "config": asdict(cfg),
        "seeds": args.seeds,
        "gammas": args.gammas,
        "settings": [s.name for s in grid],
        "runs": runs,
        "summary": summary,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - start,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
