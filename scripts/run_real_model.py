"""DPO against FocalPO on a real pretrained model, on a CPU: the real-model chapter's experiment.

SmolLM2-135M-Instruct (``focalpo_mini.real_model``) is asked for the largest number in a short
list. Pairs are on-policy: answers sampled from the model itself, judged exactly, chosen right and
rejected wrong (the paper's Llama-3-Instruct setting with an exact judge for its reward model).
Training goes through ``focalpo_mini.recipes`` and ``FocalPOTrainer`` with LoRA, the code path
of the 7B chapter with another model id and sizes.

Design, fixed before any result was seen (every number is in :class:`Config` and in the file):

1. Tuning: every method gets the same budget, the learning-rate grid ``lr_grid``, on the
   ``tuning_seeds`` (not reported), at label noise ``tuning_noise``; the rate with the best mean
   held-out accuracy is kept.
2. Reported runs on ``seeds``: a seed changes the training prompts, the sampled answers, the
   pairs, the flipped labels and the data order. The held-out prompts are the same for all.
   Run first, so that a cut keeps them: DPO and FocalPO gamma 0.5 (in the graph) at both noise
   levels. Then FocalPO gamma 0.5 detached and gamma 2 in the graph (past its sign flip at
   p < e^-1/2 = 0.61, so already at p = 1/2) at noise ``tuning_noise``.
3. Outcomes. Primary: greedy accuracy on the held-out prompts, and the win rate against the
   reference's greedy answers (ties one half). Secondary: a sampled KL to the reference,
   ``logps/chosen`` and ``logps/rejected`` over training, and Chen et al.'s four groups
   (reference right/wrong x trained model right/wrong, by the policy's own log-probs) on the
   training pairs, with their true labels.

    .venv/bin/python scripts/run_real_model.py --workers 2 [--save-models DIR]

writes results/real_model.json after every finished run; killed and restarted with the same
command, it keeps the runs already in the file (and the sampled pairs, cached in ``--work``).
Each process uses one thread: on two cores two processes are faster than one with two threads
(benchmarks/real_model.py measures it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import torch
import transformers

from focalpo_mini import real_model as rm
from focalpo_mini import recipes
from focalpo_mini.generation import greedy_answers, sampled_kl
from focalpo_mini.trl import FocalPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_small_experiment import machine_fingerprint


@dataclass(frozen=True)
class Method:
    name: str
    gamma: float
    detach: bool = False


METHODS = {
    m.name: m
    for m in (
        Method("dpo", 0.0),
        Method("focalpo_g0.5", 0.5),
        Method("focalpo_g0.5_detached", 0.5, detach=True),
        Method("focalpo_g2", 2.0),
    )
}
MUST_KEEP = ("dpo", "focalpo_g0.5")


@dataclass(frozen=True)
class Config:
    tuning_seeds: tuple[int, ...] = (100,)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    noise_levels: tuple[float, ...] = (0.0, 0.2)
    tuning_noise: float = 0.2
    lr_grid: tuple[float, ...] = (5e-5, 1.5e-4)
    train_prompts: int = 208  # per seed; sampled answers give the pairs
    samples_per_prompt: int = 4
    temperature: float = 0.5
    max_pairs_per_prompt: int = 2
    num_pairs: int = 96
    pairs_per_step: int = 8
    beta: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 32
    held_out: int = 200
    held_out_seed: int = 10_000
    kl_prompts: int = 48
    max_new_tokens: int = 32
    max_length: int = 96  # prompt + completion tokens; the task needs about 60
    sample_answers_shown: int = 6


# The script runs on a CPU (one thread per worker) or, with --workers 1, on a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _threads() -> None:
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def held_out_lists(cfg: Config) -> list[list[int]]:
    return rm.make_lists(cfg.held_out, cfg.held_out_seed)


def train_lists(seed: int, cfg: Config) -> list[list[int]]:
    held = {tuple(x) for x in held_out_lists(cfg)}
    lists = rm.make_lists(cfg.train_prompts * 2, seed)
    return [x for x in lists if tuple(x) not in held][: cfg.train_prompts]


def completion_logps(model, tokenizer, rows: list[dict], key: str) -> list[float]:
    """Summed log-probs of each row's ``key`` answer (with its end-of-turn tokens) given the
    templated prompt, as TRL tokenises a conversational pair."""
    out = []
    model.eval()
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer.apply_chat_template(
                row["prompt"], tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            p_ids = tokenizer(text=prompt)["input_ids"]
            c_ids = tokenizer(text=full[len(prompt) :])["input_ids"]
            ids = torch.tensor([p_ids + c_ids], device=next(model.parameters()).device)
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            token = logps.gather(-1, ids[0, 1:, None]).squeeze(-1)
            out.append(float(token[len(p_ids) - 1 :].sum()))
    return out


def true_pairs(rows: list[dict]) -> list[dict]:
    """Rows with the true labels back: chosen is the right answer."""
    fixed = []
    for row in rows:
        row = dict(row)
        if row["label_flipped"]:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        fixed.append(row)
    return fixed


def prepare_seed(seed: int, cfg: Config, work: Path) -> dict:
    """Sample answers from the reference, judge them, pair them; cached in ``work``."""
    path = work / f"pairs-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    _threads()
    start = time.perf_counter()
    loaded = rm.load_smollm()
    loaded.model.to(DEVICE)
    lists = train_lists(seed, cfg)
    prompts = [rm.chat_prompt(loaded.tokenizer, x) for x in lists]
    samples = rm.sample_answers(
        loaded.model,
        loaded.tokenizer,
        prompts,
        num_samples=cfg.samples_per_prompt,
        temperature=cfg.temperature,
        seed=seed,
        max_new_tokens=cfg.max_new_tokens,
    )
    rows = rm.onpolicy_pairs(
        lists, samples, seed=seed, max_pairs_per_prompt=cfg.max_pairs_per_prompt
    )
    sample_seconds = time.perf_counter() - start
    rows = rows[: cfg.num_pairs]
    record = {
        "seed": seed,
        "prompts": len(lists),
        "answers_sampled": len(lists) * cfg.samples_per_prompt,
        "sample_accuracy": statistics.fmean(
            a is not None and rm.judge_largest(x, a) == 1.0
            for x, s in zip(lists, samples, strict=True)
            for a in s
        ),
        "unfinished": sum(a is None for s in samples for a in s),
        "mixed_prompts": sum(
            len({rm.judge_largest(x, a) for a in s if a is not None}) == 2
            for x, s in zip(lists, samples, strict=True)
        ),
        "pairs_available": len(rows),
        "sample_seconds": sample_seconds,
        "rows": rows,
        "ref_logps_right": completion_logps(loaded.model, loaded.tokenizer, rows, "chosen"),
        "ref_logps_wrong": completion_logps(loaded.model, loaded.tokenizer, rows, "rejected"),
    }
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return record


def reference_eval(cfg: Config, work: Path) -> dict:
    """The reference's greedy answers to the held-out prompts (the same for every seed)."""
    path = work / "reference.json"
    if path.exists():
        return json.loads(path.read_text())
    _threads()
    loaded = rm.load_smollm()
    loaded.model.to(DEVICE)
    lists = held_out_lists(cfg)
    prompts = [rm.chat_prompt(loaded.tokenizer, x) for x in lists]
    start = time.perf_counter()
    answers = greedy_answers(
        loaded.model, loaded.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=50
    )
    record = {
        "source": loaded.source,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "lists": lists,
        "answers": answers,
        "correct": [rm.judge_largest(x, a) for x, a in zip(lists, answers, strict=True)],
        "greedy_seconds": time.perf_counter() - start,
    }
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def restore_reference(record: dict, work: Path) -> None:
    """Keep the file and the cache of the reference's held-out answers in step: a cache lost (a
    fresh checkout) is rebuilt from the file, and a new cache is copied into the file."""
    path = work / "reference.json"
    keys = ("source", "parameters", "answers", "correct")
    if not path.exists() and "reference" in record:
        work.mkdir(parents=True, exist_ok=True)
        cached = {k: record["reference"][k] for k in keys} | {"lists": record["held_out_lists"]}
        path.write_text(json.dumps(cached))
    if path.exists():
        ref = json.loads(path.read_text())
        record["reference"] = {k: ref[k] for k in keys}
        record["reference"]["accuracy"] = statistics.fmean(ref["correct"])
        record["held_out_lists"] = ref["lists"]


def run_one(
    seed: int,
    method: str,
    noise: float,
    lr: float,
    cfg: Config,
    work: Path,
    *,
    save_dir: str | None = None,
    max_steps: int | None = None,
    final_eval: bool = True,
) -> dict:
    """Train one method on one seed's pairs and measure it. Returns the run's record."""
    _threads()
    m = METHODS[method]
    prep = prepare_seed(seed, cfg, work)
    ref = reference_eval(cfg, work)
    rows = rm.flip_labels(prep["rows"], noise, seed=seed + 7919)
    steps = max_steps or len(rows) // cfg.pairs_per_step
    model_id, _ = rm.smollm_folder()
    settings = recipes.RunSettings(
        model_id=model_id,
        recipe="lora",
        gamma=m.gamma,
        beta=cfg.beta,
        learning_rate=lr,
        max_length=cfg.max_length,
        per_device_train_batch_size=cfg.pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=steps,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        output_dir=str(work / f"run-{seed}-{method}-{noise}-{lr}"),
        seed=seed,
    )
    model, tokenizer = recipes.load_model_and_tokenizer(settings)
    train = datasets.Dataset.from_list(
        [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    )
    # The recipe's arguments, with what a 135M model on a CPU does not need: no gradient
    # checkpointing (memory is plentiful), the reference's log-probs computed once, a log row
    # every step, no checkpoints (a run takes minutes; the script restarts per run).
    args = replace(
        recipes.training_config(settings),
        detach_weight=m.detach,
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = FocalPOTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=recipes.lora_config(settings),
    )
    recipes.cast_trainable_to_fp32(trainer.model)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    log = [
        {k: row[k] for k in row if k.startswith(("loss", "logps/", "rewards/", "focal/"))}
        | {"step": row["step"]}
        for row in trainer.state.log_history
        if "loss" in row
    ]
    record = {
        "seed": seed,
        "method": method,
        "noise": noise,
        "lr": lr,
        "steps": steps,
        "train_seconds": train_seconds,
        "log": log,
    }
    if not final_eval:
        return record
    # The adapter folded into the weights: the same function, and faster to generate with.
    policy = trainer.model.merge_and_unload()
    policy.eval()
    lists = ref["lists"]
    prompts = [rm.chat_prompt(tokenizer, x) for x in lists]
    start = time.perf_counter()
    answers = greedy_answers(
        policy, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=50
    )
    correct = [rm.judge_largest(x, a) for x, a in zip(lists, answers, strict=True)]
    wins = [
        1.0 if c > r else 0.5 if c == r else 0.0
        for c, r in zip(correct, ref["correct"], strict=True)
    ]
    reference = rm.load_smollm().model.to(next(policy.parameters()).device)
    kl = sampled_kl(
        policy,
        reference,
        tokenizer,
        prompts[: cfg.kl_prompts],
        seed=seed,
        max_new_tokens=cfg.max_new_tokens,
    )
    truth = true_pairs(rows)
    now_right = completion_logps(policy, tokenizer, truth, "chosen")
    now_wrong = completion_logps(policy, tokenizer, truth, "rejected")
    was = [r >= w for r, w in zip(prep["ref_logps_right"], prep["ref_logps_wrong"], strict=True)]
    now = [r >= w for r, w in zip(now_right, now_wrong, strict=True)]
    groups = {
        f"ref_{'right' if a else 'wrong'}_now_{'right' if b else 'wrong'}": sum(
            (x, y) == (a, b) for x, y in zip(was, now, strict=True)
        )
        for a in (True, False)
        for b in (True, False)
    }
    record |= {
        "accuracy": statistics.fmean(correct),
        "win_rate": statistics.fmean(wins),
        "correct": correct,
        "kl": kl,
        "chen_groups": groups,
        "logps_right_change": statistics.fmean(
            n - r for n, r in zip(now_right, prep["ref_logps_right"], strict=True)
        ),
        "logps_wrong_change": statistics.fmean(
            n - r for n, r in zip(now_wrong, prep["ref_logps_wrong"], strict=True)
        ),
        "sample_answers": answers[: cfg.sample_answers_shown],
        "eval_seconds": time.perf_counter() - start,
    }
    if save_dir is not None:
        folder = Path(save_dir) / f"seed{seed}-{method}-noise{noise}"
        policy.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (Path(save_dir) / "held_out.json").write_text(
            json.dumps({"lists": lists, "prompts": prompts, "judge": "judge_largest"})
        )
    return record


def _key(seed: int, method: str, noise: float, lr: float) -> str:
    return f"{seed}/{method}/{noise}/{lr}"


def choose_learning_rates(tuning: dict, cfg: Config) -> dict[str, float]:
    """For each method, the grid rate with the best mean held-out accuracy on the tuning seeds
    (the smaller rate on a tie)."""
    chosen = {}
    for method in METHODS:
        means = {
            lr: statistics.fmean(
                tuning[_key(s, method, cfg.tuning_noise, lr)]["accuracy"] for s in cfg.tuning_seeds
            )
            for lr in cfg.lr_grid
        }
        chosen[method] = max(cfg.lr_grid, key=lambda lr: (means[lr], -lr))
    return chosen


def _run_task(task: tuple) -> dict:
    seed, method, noise, lr, cfg, work, save_dir = task
    return run_one(seed, method, noise, lr, cfg, Path(work), save_dir=save_dir)


def _prep_task(task: tuple) -> str:
    seed, cfg, work = task
    if seed is None:
        reference_eval(cfg, Path(work))
    else:
        prepare_seed(seed, cfg, Path(work))
    return "ok"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", default="results/real_model.json")
    parser.add_argument("--work", default="runs/real_model", help="cache of sampled pairs")
    parser.add_argument("--seeds", type=int, default=len(Config.seeds))
    parser.add_argument(
        "--save-models", metavar="DIR", help="also save every reported model, merged"
    )
    args = parser.parse_args(argv)
    cfg = replace(Config(), seeds=tuple(range(args.seeds)))
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    if record and record.get("config") != json.loads(json.dumps(asdict(cfg))):
        raise SystemExit(f"{out} was written with another Config: move it away to start afresh")
    record.setdefault("config", asdict(cfg))
    record.setdefault("tuning", {})
    record.setdefault("runs", {})
    record.setdefault("wall_seconds_before", 0.0)
    previous = record["wall_seconds_before"] + record.get("wall_seconds_this_start", 0.0)
    record["wall_seconds_before"] = previous
    start = time.perf_counter()
    record |= {
        "command": "python scripts/run_real_model.py " + " ".join(sys.argv[1:]),
        "methods": {name: asdict(m) for name, m in METHODS.items()},
        "machine": machine_fingerprint(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": __import__("trl").__version__,
            "peft": __import__("peft").__version__,
        },
        "workers": args.workers,
    }

    def write(stage: str) -> None:
        record["stage"] = stage
        record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record["wall_seconds_this_start"] = time.perf_counter() - start
        record["wall_seconds"] = record["wall_seconds_before"] + record["wall_seconds_this_start"]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out)
        print(f"[{record['wall_seconds']:.0f} s] wrote {out} ({stage})", flush=True)

    work = Path(args.work)
    rm.smollm_folder()  # convert the GGUF once, before the workers start
    restore_reference(record, work)

    def summarise_pairs(seed: int) -> None:
        """The seed's pair statistics into the file; a seed sampled again (its cache lost) must
        give the pairs its earlier runs were trained on."""
        prep = prepare_seed(seed, cfg, work)
        summary = {k: v for k, v in prep.items() if k not in ("rows", "sample_seconds")}
        summary["example"] = prep["rows"][0]
        summary = json.loads(json.dumps(summary))
        old = record["pairs"].get(str(seed))
        if old is not None:
            logps = ("ref_logps_right", "ref_logps_wrong")
            same = all(old[k] == summary[k] for k in summary if k not in logps) and all(
                math.isclose(x, y, abs_tol=1e-4)
                for k in logps
                for x, y in zip(old[k], summary[k], strict=True)
            )
            if not same:
                raise SystemExit(f"seed {seed}: sampled again, its pairs differ from the file's")
        else:
            record["pairs"][str(seed)] = summary | {"sample_seconds": prep["sample_seconds"]}

    record.setdefault("pairs", {})
    with ProcessPoolExecutor(args.workers) as pool:

        def run_all(tasks: list[tuple], into: dict, stage: str) -> None:
            """Run ``tasks`` not yet in ``into``, in their order, ``args.workers`` at a time; a
            seed's pairs are sampled (when not cached) just before its first run is due."""
            waiting = [t for t in tasks if _key(*t[:4]) not in into]
            ready, busy = set(), {}  # busy: future -> ("prep", seed) or ("run", task)
            prepping = set()
            while waiting or busy:
                for task in list(waiting):
                    if len(busy) >= args.workers:
                        break
                    seed = task[0]
                    if seed in ready:
                        waiting.remove(task)
                        busy[pool.submit(_run_task, task)] = ("run", task)
                    elif seed not in prepping:
                        prepping.add(seed)
                        busy[pool.submit(_prep_task, (seed, cfg, str(work)))] = ("prep", seed)
                done, _ = wait(list(busy), return_when=FIRST_COMPLETED)
                for future in done:
                    kind, what = busy.pop(future)
                    result = future.result()
                    if kind == "prep":
                        summarise_pairs(what)
                        ready.add(what)
                    else:
                        into[_key(*what[:4])] = result
                        write(stage)

        pool.submit(_prep_task, (None, cfg, str(work))).result()  # the reference's answers
        restore_reference(record, work)
        tuning = [
            (s, m, cfg.tuning_noise, lr, cfg, str(work), None)
            for s in cfg.tuning_seeds
            for m in METHODS
            for lr in cfg.lr_grid
        ]
        run_all(tuning, record["tuning"], "tuning")
        lrs = choose_learning_rates(record["tuning"], cfg)
        record["learning_rates"] = lrs
        first = [
            (s, m, noise, lrs[m], cfg, str(work), args.save_models)
            for s in cfg.seeds
            for noise in cfg.noise_levels
            for m in MUST_KEEP
        ]
        rest = [
            (s, m, cfg.tuning_noise, lrs[m], cfg, str(work), args.save_models)
            for s in cfg.seeds
            for m in METHODS
            if m not in MUST_KEEP
        ]
        run_all(first + rest, record["runs"], "runs")
    write("done")


if __name__ == "__main__":
    main()
