"""Training throughput on a CPU: the from-scratch trainer, TRL's DPOTrainer and FocalPOTrainer.

Every configuration trains the same ~2.8M-parameter tiny Llama on the same pairs, with the same
batch size, max_length, learning rate and number of steps, in a fresh Python process (so the peak
RSS is that configuration's own, imports included):

- ``scratch``: ``focalpo_mini.trainer.train`` (FocalPO; reference log-probs cached before step 1);
- ``trl_dpo``: TRL's ``DPOTrainer`` (sigmoid) with an explicit reference model, TRL's default;
- ``trl_dpo_precompute``: the same with ``precompute_ref_log_probs=True`` (no reference model);
- ``focalpo_trl``: ``FocalPOTrainer`` configured like ``trl_dpo``.

A step is timed from one training forward pass of the policy to the next (a forward pre-hook,
the same for every trainer), so it covers collation, forward, backward, clipping, the optimiser
and logging, but not set-up (tokenisation, reference precomputation, everything before the first
step), which is reported apart as ``setup_s``.
The first ``--warmup`` steps are not counted. tokens/s = non-padding tokens the policy saw in the
counted steps (chosen and rejected rows) / the counted steps' total time.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_throughput.py`` (about 15 minutes on
a busy 2-core machine). It prints a table and writes ``benchmarks/results/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("scratch", "trl_dpo", "trl_dpo_precompute", "focalpo_trl")
MODEL_CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}
RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


def _worker(name: str, args: argparse.Namespace) -> dict:
    """Train one configuration in this process; return its timings."""
    import torch

    from focalpo_mini.data import make_preference_dataset
    from focalpo_mini.tiny import make_model, make_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    total_steps = args.warmup + args.steps + 1  # + 1: a step ends where the next one starts
    tokenizer = make_tokenizer()
    dataset = make_preference_dataset(
        args.batch_size * total_steps, seed=0, min_len=6, max_len=10
    )  # one epoch, so every trainer sees every pair once
    model = make_model(tokenizer, seed=0, **MODEL_CONFIG)
    starts, cpu_starts, tokens = [], [], []

    def on_forward(module, _args, kwargs) -> None:
        if module.training and torch.is_grad_enabled():  # training steps only, not the reference
            starts.append(time.perf_counter())
            cpu_starts.append(time.process_time())
            tokens.append(int(kwargs["attention_mask"].sum()))

    model.register_forward_pre_hook(on_forward, with_kwargs=True)
    setup_start = time.perf_counter()
    if name == "scratch":
        from focalpo_mini.trainer import TrainConfig, train

        config = TrainConfig(
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_steps=total_steps,
            max_length=args.max_length,
            progress=False,
        )
        train(model, tokenizer, dataset, config=config)
    else:
        _train_trl(name, model, tokenizer, dataset, total_steps, args)
    wall = time.perf_counter() - setup_start

    step_times = [b - a for a, b in itertools.pairwise(starts)][args.warmup :]
    cpu_times = [b - a for a, b in itertools.pairwise(cpu_starts)][args.warmup :]
    counted_tokens = tokens[args.warmup : args.warmup + len(step_times)]
    if len(step_times) != args.steps:
        raise RuntimeError(f"{name}: timed {len(step_times)} steps, expected {args.steps}")
    return {
        "config": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": len(step_times),
        "median_step_s": statistics.median(step_times),
        "tokens_per_s": sum(counted_tokens) / sum(step_times),
        "median_step_cpu_s": statistics.median(cpu_times),
        "tokens_per_cpu_s": sum(counted_tokens) / sum(cpu_times),
        "tokens_per_step": sum(counted_tokens) / len(counted_tokens),
        "setup_s": starts[0] - setup_start,
        "wall_s": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_1min": os.getloadavg()[0],  # other jobs on the machine, at the run's end
    }


def _train_trl(name, model, tokenizer, dataset, total_steps, args) -> None:
    from focalpo_mini.tiny import make_model

    if name == "focalpo_trl":
        from focalpo_mini.trl import FocalPOConfig as Config
        from focalpo_mini.trl import FocalPOTrainer as Trainer
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

    precompute = name == "trl_dpo_precompute"
    config = Config(
        output_dir=args.output_dir,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        max_steps=total_steps,
        max_length=args.max_length,
        lr_scheduler_type="linear",
        precompute_ref_log_probs=precompute,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        logging_steps=10,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    ref_model = None if precompute else make_model(tokenizer, seed=0, **MODEL_CONFIG)
    trainer = Trainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()


def _machine() -> dict:
    import torch
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["config"] == "trl_dpo")
    header = (
        "config",
        "tokens/s",
        "vs trl_dpo",
        "step ms",
        "tok/CPU-s",
        "vs trl_dpo",
        "CPU step ms",
        "set-up s",
        "peak RSS MiB",
    )
    lines = [" ".join(f"{h:>12}" for h in header)]
    for r in rows:
        cells = (
            r["config"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            f"{1000 * r['median_step_s']:.1f}",
            f"{r['tokens_per_cpu_s']:.0f}",
            f"{r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x",
            f"{1000 * r['median_step_cpu_s']:.1f}",
            f"{r['setup_s']:.1f}",
            f"{r['peak_rss_mib']:.0f}",
        )
        lines.append(f"{cells[0]:<20}" + " ".join(f"{c:>12}" for c in cells[1:]))
    lines[0] = f"{'config':<20}" + lines[0][12:]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--output-dir", default="/tmp/focalpo_bench", help="TRL's output_dir")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):  # interleaved, so background load hits every config alike
        for name in CONFIGS:
            command = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: done", file=sys.stderr)

    rows = []
    for name, results in runs.items():
        medians = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "config"}
        rows.append({"config": name, **medians, "runs": results})
    table = _table(rows)
    print(table)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "output", "output_dir")}
    report = {
        "machine": _machine(),
        "settings": {**settings, "model": MODEL_CONFIG},
        "summary": "median over repeats of each run's value; CPU-time columns count the "
        "process's CPU seconds, wall-time columns include waiting for a core on a shared machine",
        "results": rows,
        "table": table,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
