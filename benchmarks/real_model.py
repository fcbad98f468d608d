"""Where the real-model experiment's time goes: SmolLM2-135M-Instruct on this CPU.

Prints a table and writes benchmarks/results/real_model.json:

- seconds per training step (8 pairs of the task, one thread) for FocalPOTrainer with LoRA and
  with full fine-tuning, each with and without the reference's log-probs precomputed, beside the
  same LoRA step in plain ``trl.DPOTrainer``;
- answers per second when sampling (batched, one thread), and a greedy batch with one thread
  against two;
- peak resident memory of the process.

    .venv/bin/python benchmarks/real_model.py [--steps 3]

Timings move with the load of the machine: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import torch
import transformers
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from focalpo_mini import real_model as rm
from focalpo_mini import recipes
from focalpo_mini.generation import greedy_answers
from focalpo_mini.trl import FocalPOTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from run_real_model import Config, train_lists  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time of every optimiser step."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def pairs(n: int) -> datasets.Dataset:
    """``n`` task pairs: a right and a wrong answer of the model's usual form."""
    rows = []
    for numbers in train_lists(0, Config())[:n]:
        wrong = min(numbers) if min(numbers) != max(numbers) else max(numbers) + 1
        rows.append(
            {
                "prompt": rm.conversation(numbers),
                "chosen": [
                    {
                        "role": "assistant",
                        "content": f"The largest number in this list is {max(numbers)}.",
                    }
                ],
                "rejected": [
                    {"role": "assistant", "content": f"The largest number in this list is {wrong}."}
                ],
            }
        )
    return datasets.Dataset.from_list(rows)


def step_seconds(recipe: str, precompute: bool, trainer_class, steps: int) -> float:
    """Median seconds per step after one untimed step."""
    cfg = Config()
    model_id, _ = rm.smollm_folder()
    settings = recipes.RunSettings(
        model_id=model_id,
        recipe=recipe,
        beta=cfg.beta,
        learning_rate=1e-4,
        max_length=cfg.max_length,
        per_device_train_batch_size=cfg.pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=steps + 1,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        output_dir=tempfile.mkdtemp(),
    )
    model, tokenizer = recipes.load_model_and_tokenizer(settings)
    args = replace(
        recipes.training_config(settings),
        gradient_checkpointing=False,
        precompute_ref_log_probs=precompute,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    kwargs = {}
    if trainer_class is DPOTrainer:
        fields = {f: getattr(args, f) for f in DPOConfig.__dataclass_fields__ if hasattr(args, f)}
        args = DPOConfig(**{k: v for k, v in fields.items() if k not in ("gamma", "detach_weight")})
    if recipe == "full" and not precompute:
        kwargs["ref_model"] = rm.load_smollm().model
    timer = StepTimer()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=pairs(cfg.pairs_per_step * (steps + 1)),
        processing_class=tokenizer,
        peft_config=recipes.lora_config(settings),
        callbacks=[timer],
        **kwargs,
    )
    recipes.cast_trainable_to_fp32(trainer.model)
    trainer.train()
    timed = sorted(timer.times[1:])
    return timed[len(timed) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/real_model.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    rows = {}
    for label, recipe, precompute, cls in (
        ("FocalPOTrainer, LoRA, reference precomputed", "lora", True, FocalPOTrainer),
        ("FocalPOTrainer, LoRA, reference each step", "lora", False, FocalPOTrainer),
        ("FocalPOTrainer, full, reference precomputed", "full", True, FocalPOTrainer),
        ("FocalPOTrainer, full, reference model each step", "full", False, FocalPOTrainer),
        ("trl.DPOTrainer, LoRA, reference precomputed", "lora", True, DPOTrainer),
    ):
        rows[f"{label} (s/step)"] = step_seconds(recipe, precompute, cls, args.steps)
        print(f"{label:55s} {rows[f'{label} (s/step)']:7.2f} s/step", flush=True)
    loaded = rm.load_smollm()
    cfg = Config()
    prompts = [rm.chat_prompt(loaded.tokenizer, x) for x in train_lists(1, cfg)[:16]]
    start = time.perf_counter()
    samples = rm.sample_answers(
        loaded.model,
        loaded.tokenizer,
        prompts,
        num_samples=cfg.samples_per_prompt,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
    )
    rows["sampled answers per second (one thread)"] = sum(map(len, samples)) / (
        time.perf_counter() - start
    )
    for threads in (1, 2):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        greedy_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens)
        rows[f"greedy batch of {len(prompts)}, {threads} thread(s) (s)"] = (
            time.perf_counter() - start
        )
    rows["peak RSS (GB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    for key in list(rows)[5:]:
        print(f"{key:55s} {rows[key]:7.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"rows": rows, "steps": args.steps, "torch": torch.__version__}, indent=1)
    )


if __name__ == "__main__":
    main()
