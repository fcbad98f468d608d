"""Train FocalPO with TRL: the 7B chapter's code path as a command-line script.

One GPU (QLoRA or LoRA):
    python scripts/train_focalpo.py --recipe qlora --output-dir runs/mistral-qlora
Eight GPUs, full fine-tuning with DeepSpeed ZeRO-3 (``pip install "focalpo_mini[deepspeed]"``):
    accelerate launch --config_file configs/accelerate/deepspeed_zero3_8gpu.yaml \\
        scripts/train_focalpo.py --recipe full --output-dir runs/mistral-full
Eight GPUs, the LoRA recipes as data parallelism:
    accelerate launch --config_file configs/accelerate/ddp_8gpu.yaml \\
        scripts/train_focalpo.py --recipe lora --output-dir runs/mistral-lora
CPU smoke test on two processes (gloo DDP; `accelerate launch --cpu` would run only one):
    torchrun --nproc_per_node 2 scripts/train_focalpo.py --smoke --output-dir /tmp/smoke

LoRA under ZeRO-3 or FSDP, and the full recipe under FSDP, are refused before anything loads
(see ``focalpo_mini.recipes.check_launch``). A checkpoint is written every ``--save-steps``
steps; running the same command again resumes from the newest complete one in ``--output-dir``,
and the same command with other settings is refused (the folder records the run's plan).

Every process writes ``<output-dir>/ranks/rank<k>.json`` (its rank, the world size, the optimiser
steps it ran and its last logged loss), so a launcher can check that all of them trained.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from focalpo_mini.memory import RECIPES
from focalpo_mini.recipes import (
    ProgressReport,
    RunSettings,
    build_trainer,
    generate_samples,
    load_model_and_tokenizer,
    load_preference_data,
    process_state,
    run_plan,
    sample_prompts,
    train,
)


def parse_args(argv: list[str] | None = None) -> tuple[RunSettings, int]:
    """Command-line flags -> (:class:`RunSettings`, number of sample prompts to generate for)."""
    defaults = RunSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny local model and data, few steps")
    parser.add_argument("--recipe", choices=RECIPES, default=defaults.recipe)
    parser.add_argument("--model-id", default=defaults.model_id)
    parser.add_argument("--dataset-id", default=defaults.dataset_id)
    parser.add_argument("--gamma", type=float, default=defaults.gamma)
    parser.add_argument("--beta", type=float, default=defaults.beta)
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="default: 5e-6 LoRA, 5e-7 full"
    )
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument(
        "--per-device-train-batch-size", type=int, default=defaults.per_device_train_batch_size
    )
    parser.add_argument(
        "--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps
    )
    parser.add_argument("--num-train-epochs", type=float, default=defaults.num_train_epochs)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--num-pairs", type=int, default=None, help="default: whole split")
    parser.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    parser.add_argument("--save-steps", type=int, default=defaults.save_steps)
    parser.add_argument("--save-total-limit", type=int, default=defaults.save_total_limit)
    parser.add_argument("--lora-r", type=int, default=defaults.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    parser.add_argument(
        "--num-samples", type=int, default=3, help="prompts to sample before/after (0: none)"
    )
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = vars(parser.parse_args(argv))
    num_samples = args.pop("num_samples")
    return RunSettings(**args), num_samples


def main(argv: list[str] | None = None) -> None:
    settings, num_samples = parse_args(argv)
    settings = settings.resolved()
    state = process_state()

    model, tokenizer = load_model_and_tokenizer(settings)
    train_data = load_preference_data(settings, "train")
    # A full 7B model waits in CPU memory until ZeRO-3/FSDP shards it: no sampling there.
    if settings.recipe == "full" and not settings.smoke:
        num_samples = 0
    prompts = (
        sample_prompts(load_preference_data(settings, "test"), num_samples) if num_samples else []
    )
    before = generate_samples(model, tokenizer, prompts, settings.max_new_tokens)

    trainer = build_trainer(settings, model, tokenizer, train_data)
    trainer.add_callback(ProgressReport())
    # Resumes from the newest complete checkpoint in output_dir; a finished run returns at once.
    result = train(trainer)
    if not result.metrics.get("already_finished"):
        trainer.save_model(settings.output_dir)  # the adapter alone with LoRA; the model with full

    after = generate_samples(trainer.model, tokenizer, prompts, settings.max_new_tokens)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "global_step": trainer.state.global_step,
        "last_loss": losses[-1] if losses else None,
        "plan": run_plan(settings),
    }
    ranks = Path(settings.output_dir) / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    (ranks / f"rank{state.process_index}.json").write_text(json.dumps(record, indent=2))
    if state.is_main_process:
        mode = "SMOKE (tiny local model)" if settings.smoke else settings.model_id
        print(f"mode: {mode}, recipe {settings.recipe}, {state.num_processes} process(es)")
        for prompt, old, new in zip(prompts, before, after, strict=True):
            print(f"prompt: {prompt[-1]['content']!r}\n  before: {old!r}\n  after:  {new!r}")


if __name__ == "__main__":
    main()
