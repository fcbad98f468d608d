"""FocalPO training steps on a 7B-shaped model with random weights: time, tokens/s, MFU, memory.

On a CUDA GPU it builds Mistral-7B's architecture (``transformers.MistralConfig``) with random
weights directly on the GPU, so nothing is downloaded, and runs ``FocalPOTrainer`` through the
book's code path (``focalpo_mini.recipes``: the same LoRA and training configs) for every recipe
whose memory plan (``focalpo_mini.memory``) fits the GPU. Without CUDA it does a dry run of the
same code on a tiny shape (QLoRA with bitsandbytes' CPU 4-bit kernels), which
``tests/test_gpu_benchmark.py`` covers.

Run: ``HF_HUB_OFFLINE=1 python benchmarks/gpu_7b_step.py`` (a few minutes on an 80 GB GPU).
It prints a table and writes ``benchmarks/results/gpu_7b_step_<gpu>.json`` (``--output`` to change)
after every recipe, so a recipe that runs out of memory (recorded as such) or a crash later on
loses nothing measured before it.

How it measures:

- Every sequence is exactly ``--max-length`` tokens (random digit text truncated by TRL), so a
  step processes ``2 x batch x max_length`` policy tokens (chosen and rejected rows).
- A step is timed from one optimiser step to the next with ``torch.cuda.synchronize()`` (a
  Trainer callback); the first ``--warmup`` steps are not counted; the median is reported.
- MFU (model FLOPs utilisation, PaLM's definition, the one the 7B chapter uses) = model FLOPs
  per step / (step time x the GPU's dense 16-bit peak). Model FLOPs are
  ``focalpo_mini.recipes.model_flops_per_token``: 6N per token (N without the embedding) for
  every recipe, weight matmuls only; recomputation by gradient checkpointing is not counted (it
  is overhead, not model work). A GPU whose exact name is missing from
  ``focalpo_mini.recipes.PEAK_16BIT_TFLOPS`` gets no MFU.
- Peak memory is ``torch.cuda.max_memory_allocated`` during the steps (what tensors held) and
  ``torch.cuda.max_memory_reserved`` (what the caching allocator took from the GPU, the number
  that must fit), next to the plan's estimate. The optimiser is the recipes' own: fused AdamW
  (no foreach temporaries) for LoRA and full, paged AdamW for QLoRA.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import MistralConfig, MistralForCausalLM, TrainerCallback

from focalpo_mini.memory import (
    MISTRAL_7B_SHAPE,
    RECIPES,
    USABLE_FRACTION,
    memory_plan,
)
from focalpo_mini.recipes import (
    RunSettings,
    cast_trainable_to_fp32,
    compute_dtype,
    lora_config,
    model_flops_per_token,
    peak_tflops,
    training_config,
)
from focalpo_mini.tiny import make_tokenizer
from focalpo_mini.trl import FocalPOTrainer

RESULTS = Path(__file__).parent / "results"

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


class _StepTimer(TrainerCallback):
    """Wall time of each optimiser step, with the GPU's queue drained at both ends."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def _random_pairs(n: int, max_length: int, seed: int) -> Dataset:
    """Plain-text pairs long enough that TRL truncates every sequence to ``max_length`` tokens."""
    rng = random.Random(seed)

    def digits(k: int) -> str:
        return " ".join(str(rng.randrange(10)) for _ in range(k))

    rows = [
        {
            "prompt": digits(max_length // 8) + "\n",
            "chosen": digits(2 * max_length),
            "rejected": digits(2 * max_length),
        }
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def _quantize_linears_nf4(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Swap the decoder layers' nn.Linear for bitsandbytes NF4 (double quantisation), in place."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data.cpu().to(compute_dtype),
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                setattr(parent, name, quantized.to(child.weight.device))
                del child
    model.is_loaded_in_4bit = True  # what TRL and PEFT check to treat the model as 4-bit
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _build_model(shape: dict, recipe: str, on_gpu: bool) -> MistralForCausalLM:
    """Random weights of ``shape``, built on the GPU (or CPU) in the recipe's storage dtype."""
    config = MistralConfig(**shape)
    # The recipes' storage dtypes: fp32 for full fine-tuning, the compute dtype (bf16, or fp16
    # on a GPU without native bf16) for the LoRA bases.
    dtype = torch.float32 if recipe == "full" else compute_dtype()
    device = "cuda" if on_gpu else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if recipe == "qlora":
        _quantize_linears_nf4(model, dtype)
    return model


def run_recipe(recipe: str, args: argparse.Namespace, shape: dict) -> dict:
    """Train ``args.warmup + args.steps`` FocalPO steps with ``recipe``; return the measurements."""
    on_gpu = torch.cuda.is_available()
    tokenizer = make_tokenizer()
    settings = RunSettings(
        recipe=recipe,
        max_length=args.max_length,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        output_dir=str(args.scratch_dir / recipe),
    ).resolved()
    config = dataclasses.replace(training_config(settings), logging_steps=args.warmup + args.steps)
    model = _build_model(shape, recipe, on_gpu)
    pairs = _random_pairs(args.batch_size * (args.warmup + args.steps), args.max_length, seed=0)
    trainer = FocalPOTrainer(
        model=model,
        args=config,
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=lora_config(settings),
    )
    cast_trainable_to_fp32(trainer.model)  # as recipes.build_trainer does
    prepared = trainer.train_dataset
    shortest = min(
        len(p) + min(len(c), len(r))
        for p, c, r in zip(
            prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"], strict=True
        )
    )
    if shortest < args.max_length:  # then tokens/s and MFU below would be overstated
        raise RuntimeError(
            f"a pair is {shortest} tokens, shorter than max_length {args.max_length}"
        )
    timer = _StepTimer()
    trainer.add_callback(timer)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    counted = timer.times[args.warmup :]
    step_s = statistics.median(counted)
    tokens = 2 * args.batch_size * args.max_length
    flops_per_token = model_flops_per_token(model.config)
    result = {
        "recipe": recipe,
        "steps_timed": len(counted),
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_tflops_per_step": flops_per_token * tokens / 1e12,
        "mfu": None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if on_gpu else None,
        "optim": trainer.args.optim,
        "planned_memory_gb": memory_plan(
            model.config, recipe, max_length=args.max_length, batch_size=args.batch_size
        ).total,
    }
    peak = peak_tflops(_gpu_name())
    if peak is not None:
        result["mfu"] = result["model_tflops_per_step"] / (step_s * peak)
    return result


def _gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _out_of_memory_row(recipe: str, error: Exception, args, shape: dict) -> dict:
    """What is known of a recipe that ran out of GPU memory: the peaks reached, and the plan."""
    on_gpu = torch.cuda.is_available()
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return {
        "recipe": recipe,
        "error": f"out of memory: {first_line}",
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if on_gpu else None,
        "planned_memory_gb": memory_plan(
            MistralConfig(**shape), recipe, max_length=args.max_length, batch_size=args.batch_size
        ).total,
    }


def recipes_that_fit(shape: dict, args: argparse.Namespace) -> list[str]:
    """Recipes whose memory plan fits this GPU (all of them for the CPU dry run)."""
    if not torch.cuda.is_available():
        return list(RECIPES)
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    config = MistralConfig(**shape)
    return [
        r
        for r in RECIPES
        if memory_plan(config, r, max_length=args.max_length, batch_size=args.batch_size).total
        <= USABLE_FRACTION * memory_gb
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=None, help="default 1024 (GPU), 32 (CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (GPU), 2 (CPU)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--scratch-dir", type=Path, default=Path("/tmp/gpu_7b_step"))
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    args.max_length = args.max_length or (1024 if on_gpu else 32)
    args.batch_size = args.batch_size or (4 if on_gpu else 2)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    shape = MISTRAL_7B_SHAPE if on_gpu else TINY
    fitting = recipes_that_fit(shape, args)
    recipes = [r for r in (args.recipes or RECIPES) if r in fitting]
    report = {
        "gpu": _gpu_name(),
        "dry_run": not on_gpu,
        "shape": "Mistral-7B" if on_gpu else "tiny (dry run)",
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "skipped": [r for r in (args.recipes or RECIPES) if r not in fitting],
        "results": [],
    }
    slug = "".join(c if c.isalnum() else "_" for c in report["gpu"]).strip("_").lower()
    output = args.output or RESULTS / f"gpu_7b_step_{slug}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"{report['gpu']}: {report['shape']}, batch {args.batch_size} x {args.max_length} tokens")
    print(
        f"{'recipe':>6} {'step s':>8} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8} "
        f"{'reserved':>8} {'plan GB':>8}"
    )
    for recipe in recipes:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            row = run_recipe(recipe, args, shape)
        except torch.OutOfMemoryError as error:
            row = _out_of_memory_row(recipe, error, args, shape)
        _free_memory()  # after the except block, whose traceback held the model
        report["results"].append(row)
        output.write_text(json.dumps(report, indent=2) + "\n")
        _print_row(row)
    if report["skipped"]:
        print(f"skipped (plan does not fit): {report['skipped']}")
    print(f"wrote {output}")
    return report


def _print_row(row: dict) -> None:
    def gb(value):
        return f"{value:.1f}" if value is not None else "-"

    if "error" in row:
        print(
            f"{row['recipe']:>6} {row['error']}; peak {gb(row['peak_memory_gb'])} GB, reserved "
            f"{gb(row['peak_reserved_gb'])} GB, plan {row['planned_memory_gb']:.1f} GB"
        )
        return
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
    print(
        f"{row['recipe']:>6} {row['step_s']:8.3f} {row['tokens_per_s']:10.0f} {mfu:>6} "
        f"{gb(row['peak_memory_gb']):>8} {gb(row['peak_reserved_gb']):>8} "
        f"{row['planned_memory_gb']:8.1f}"
    )


if __name__ == "__main__":
    main()
