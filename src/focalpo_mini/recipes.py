"""One code path for a FocalPO run: a 7B model on GPUs, or the tiny world on a CPU (smoke mode).

The 7B chapter and ``scripts/train_focalpo.py`` both call, in order,
:func:`load_model_and_tokenizer`, :func:`load_preference_data`, :func:`generate_samples`,
:func:`build_trainer` and :func:`train` (which resumes from the last checkpoint). Smoke mode
swaps the hub model and data for local stand-ins and trains for a few steps; every other line
is the same. This module imports ``trl`` and ``peft`` (``pip install "focalpo_mini[trl]"``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset, load_dataset, load_from_disk
from peft import LoraConfig
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from focalpo_mini.data import make_preference_dataset
from focalpo_mini.memory import ALL_PROJECTIONS, RECIPES, native_bf16, parameter_count
from focalpo_mini.tiny import make_model, make_tokenizer
from focalpo_mini.trl import FocalPOConfig, FocalPOTrainer

# What smoke mode replaces, and with what. Applied (with a warning naming every value of yours it
# replaces) by ``RunSettings.resolved()``.
SMOKE_OVERRIDES = {
    "max_length": 64,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_steps": 4,
    "num_pairs": 32,
    # The tiny model starts from random weights; at 7B-scale learning rates it would not move.
    "learning_rate": 1e-3,
    # A linear warm-up starts at a learning rate of 0, so in a 4-step run it would spend step 1
    # not moving at all (step 2 would then show the same zero margins as step 1).
    "warmup_ratio": 0.0,
    "save_steps": 2,
    "max_new_tokens": 12,
}

# Pairs in the train split of ``trl-lib/ultrafeedback_binarized`` (its dataset card on the Hub).
ULTRAFEEDBACK_TRAIN_PAIRS = 62_135

# Dense 16-bit tensor-core peak, TFLOP/s, from the vendors' data sheets: bf16 where the GPU has
# it, fp16 on the T4. Matched in this order by substring against ``torch.cuda.get_device_name()``
# (so "L40S" comes before "L4").
PEAK_16BIT_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "T4": 65.0,
}

_INT_FIELDS = (
    "max_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lora_r",
    "lora_alpha",
    "max_new_tokens",
    "save_steps",
    "save_total_limit",
)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunSettings:
    """Everything that defines a run. ``learning_rate=None`` takes the recipe's default.

    Defaults follow the TRL documentation and alignment-handbook recipes for 7B DPO (beta 0.01,
    learning rate 5e-6 with LoRA, 5e-7 for full fine-tuning, max_length 1024, 4 pairs x 4
    accumulation steps, 10% warm-up); gamma 0.5 is this library's default (see
    ``focalpo_mini.focalpo_loss``). None of them is the FocalPO paper's: the paper does not state
    its values in any source this library could check.

    A checkpoint is written every ``save_steps`` optimiser steps to ``output_dir``, keeping the
    last ``save_total_limit``; :func:`train` resumes from the newest one.

    Every field is checked when the settings are made: a wrong type raises ``TypeError`` and a
    value out of range ``ValueError``, each naming the field.
    """

    model_id: str = "HuggingFaceH4/mistral-7b-sft-beta"
    dataset_id: str = "trl-lib/ultrafeedback_binarized"
    recipe: str = "qlora"
    smoke: bool = False
    gamma: float = 0.5
    beta: float = 0.01
    learning_rate: float | None = None
    max_length: int = 1024
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    num_pairs: int | None = None  # None: the whole training split
    warmup_ratio: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 32
    max_new_tokens: int = 128
    output_dir: str = "focalpo-run"
    save_steps: int = 50
    save_total_limit: int = 2
    seed: int = 42
    is_resolved: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("model_id", "dataset_id", "recipe", "output_dir"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {getattr(self, name)!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        for name in ("smoke", "is_resolved"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("gamma", "beta", "num_train_epochs", "warmup_ratio"):
            value = getattr(self, name)
            if not _is_real(value):
                raise TypeError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate is not None:
            if not _is_real(self.learning_rate):
                raise TypeError(
                    f"learning_rate must be a real number or None, got {self.learning_rate!r}"
                )
            if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
                raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
        for name in (*_INT_FIELDS, "max_steps", "seed"):
            if not _is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in _INT_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(
                f"max_steps must be >= 1, or -1 for whole epochs, got {self.max_steps}"
            )
        if self.num_pairs is not None:
            if not _is_int(self.num_pairs):
                raise TypeError(f"num_pairs must be an int or None, got {self.num_pairs!r}")
            if self.num_pairs < 1:
                raise ValueError(f"num_pairs must be >= 1 or None, got {self.num_pairs}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def resolved(self) -> RunSettings:
        """These settings with smoke mode's overrides and the recipe's learning rate filled in.

        In smoke mode every field of :data:`SMOKE_OVERRIDES` is replaced; a ``UserWarning``
        names each one you had set to something else than its default. Resolving twice changes
        nothing, so a resolved copy can be edited (``dataclasses.replace``) and passed on.
        """
        if self.is_resolved:
            return self
        settings = self
        if self.smoke:
            defaults = RunSettings()
            replaced = {
                name: (getattr(self, name), value)
                for name, value in SMOKE_OVERRIDES.items()
                if getattr(self, name) != getattr(defaults, name) and getattr(self, name) != value
            }
            if replaced:
                listing = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in replaced.items())
                warnings.warn(
                    f"smoke mode replaces settings you chose: {listing}", UserWarning, stacklevel=2
                )
            settings = dataclasses.replace(self, **SMOKE_OVERRIDES)
        if settings.learning_rate is None:
            rate = 5e-7 if settings.recipe == "full" else 5e-6
            settings = dataclasses.replace(settings, learning_rate=rate)
        return dataclasses.replace(settings, is_resolved=True)

    @property
    def pairs_per_step(self) -> int:
        """Preference pairs per optimiser step on one process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


def compute_dtype(capability: tuple[int, int] | None = None) -> torch.dtype:
    """The dtype training computes in: bf16, fp16 or fp32.

    bf16 on GPUs with native bf16 (compute capability 8.0 or higher: A100, L4, H100), fp16 on
    older GPUs (a T4 is 7.5, where bf16 is only emulated, without tensor cores), fp32 on a CPU.
    ``capability`` asks about a GPU of that compute capability; None asks torch about this
    machine's first GPU. ``torch.cuda.is_bf16_supported()`` is not used: by default it counts
    emulation and says True on a T4.
    """
    if capability is None:
        if not torch.cuda.is_available():
            return torch.float32
        capability = tuple(torch.cuda.get_device_capability(0))
    return torch.bfloat16 if native_bf16(capability) else torch.float16


def describe_hardware() -> str:
    """One line: the GPU, its memory and compute capability, and the dtype training will use."""
    dtype = compute_dtype()
    if not torch.cuda.is_available():
        return f"No CUDA GPU: training computes in {dtype} (smoke mode)."
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    native = "native bf16" if native_bf16((major, minor)) else "no native bf16"
    scaler = ", with a loss scaler" if dtype == torch.float16 else ""
    return (
        f"GPU: {props.name}, {props.total_memory / 1e9:.1f} GB, compute capability "
        f"{major}.{minor} ({native}): mixed precision in {dtype}{scaler}; trainable parameters "
        f"in torch.float32."
    )


def launcher() -> tuple[str | None, int | None]:
    """(``"deepspeed"``, ZeRO stage), (``"fsdp"``, None) or (None, None): what ``accelerate launch``
    set up for this process, read from the environment it passes (``ACCELERATE_USE_DEEPSPEED``,
    ``ACCELERATE_DEEPSPEED_ZERO_STAGE``, ``ACCELERATE_USE_FSDP``)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return "deepspeed", int(stage) if stage else None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp", None
    return None, None


def check_launch(settings: RunSettings) -> None:
    """Refuse the combinations of recipe and launcher this book does not support, before loading.

    - LoRA recipes under ZeRO-3 or FSDP: they shard a model whose few trainable parameters do
      not need it, and the 4-bit base of QLoRA cannot be sharded by them. Use one GPU, or
      ``configs/accelerate/ddp_8gpu.yaml`` for data parallelism.
    - The full recipe under FSDP: it precomputes the reference log-probs, and under FSDP TRL 1.16
      loads a second full model from the hub for that pass. Use ZeRO-3
      (``configs/accelerate/deepspeed_zero3_8gpu.yaml``), where the policy computes them.
    """
    backend, stage = launcher()
    if settings.recipe != "full" and (backend == "fsdp" or (backend, stage) == ("deepspeed", 3)):
        name = "FSDP" if backend == "fsdp" else "DeepSpeed ZeRO-3"
        raise ValueError(
            f"recipe {settings.recipe!r} is not supported under {name}: the LoRA recipes train "
            f"on one GPU or with plain data parallelism (configs/accelerate/ddp_8gpu.yaml)"
        )
    if settings.recipe == "full" and backend == "fsdp":
        raise ValueError(
            "recipe 'full' is not supported under FSDP: it precomputes the reference log-probs, "
            "for which TRL would load a second full model on every process; use DeepSpeed "
            "ZeRO-3 (configs/accelerate/deepspeed_zero3_8gpu.yaml)"
        )


def load_model_and_tokenizer(settings: RunSettings):
    """The policy model and its tokenizer.

    Smoke mode: the tiny world's Llama and tokenizer, built locally. Otherwise
    ``settings.model_id`` (a hub name or a local folder), in 4-bit NF4 with double quantisation
    for ``"qlora"``, in the compute dtype (:func:`compute_dtype`) for ``"lora"``, in fp32 for
    ``"full"``. The model goes on this process's GPU, except for full fine-tuning on several
    processes, where DeepSpeed ZeRO-3 shards and places it. Under ZeRO-3 the training
    arguments are built first, so that the weights are partitioned while they load instead of
    every process holding a full fp32 copy in CPU memory.
    """
    settings = settings.resolved()
    check_launch(settings)
    if settings.smoke:
        tokenizer = make_tokenizer()
        return make_model(tokenizer, seed=settings.seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = compute_dtype()
    # Full fine-tuning keeps fp32 weights (the optimiser updates them) and computes in autocast.
    kwargs: dict = {"dtype": torch.float32 if settings.recipe == "full" else dtype}
    state = process_state()
    # Full fine-tuning on several processes is sharded by DeepSpeed, which places the weights.
    if torch.cuda.is_available() and (settings.recipe != "full" or state.num_processes == 1):
        kwargs["device_map"] = {"": state.local_process_index}
    if settings.recipe == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    # transformers partitions at load time (deepspeed.zero.Init) only while a TrainingArguments
    # with a ZeRO-3 config is alive: this one is, until from_pretrained returns.
    zero3_args = training_config(settings) if launcher() == ("deepspeed", 3) else None
    model = AutoModelForCausalLM.from_pretrained(settings.model_id, **kwargs)
    del zero3_args
    tokenizer = AutoTokenizer.from_pretrained(settings.model_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def smoke_preference_data(n: int, *, seed: int) -> Dataset:
    """Tiny-world pairs in the schema of ``trl-lib/ultrafeedback_binarized``.

    Columns ``chosen`` and ``rejected`` are whole conversations, ``[user, assistant]``, with no
    separate prompt column (TRL extracts the shared prompt); ``score_chosen`` and
    ``score_rejected`` put the true reward (in [0, 1] for these pairs) on UltraFeedback's 1-10
    scale.
    """
    pairs = make_preference_dataset(n, seed=seed, conversational=True)
    rows = [
        {
            "chosen": row["prompt"] + row["chosen"],
            "rejected": row["prompt"] + row["rejected"],
            "score_chosen": 1.0 + 9.0 * row["chosen_reward"],
            "score_rejected": 1.0 + 9.0 * row["rejected_reward"],
        }
        for row in pairs
    ]
    return Dataset.from_list(rows)


def process_state() -> PartialState:
    """This process's place in the launch (rank, world size), for torchrun or accelerate.

    Without CUDA, accelerate only recognises a torchrun launch as multi-process when told it is on
    a CPU; otherwise every process believes it is the main one and they race on shared files.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def load_preference_data(settings: RunSettings, split: str = "train") -> Dataset:
    """Training (or ``"test"``) pairs: ``settings.dataset_id`` from the hub, or smoke data.

    ``num_pairs`` keeps the first pairs of the training split (the same ones on every re-run,
    so a resumed run continues on the same data). Smoke data is written to ``output_dir`` and
    read back, so that several processes share one on-disk dataset: TRL's reference
    precomputation fails under DDP with an in-memory dataset.
    """
    if not isinstance(settings, RunSettings):
        raise TypeError(f"settings must be a RunSettings, got {type(settings).__name__}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    settings = settings.resolved()
    if not settings.smoke:
        dataset = load_dataset(settings.dataset_id, split=split)
        if split == "train" and settings.num_pairs is not None:  # a subset to train on
            dataset = dataset.select(range(min(settings.num_pairs, len(dataset))))
        return dataset
    seed = settings.seed if split == "train" else settings.seed + 1
    path = Path(settings.output_dir) / f"smoke_data_{split}"
    state = process_state()
    with state.main_process_first():
        if state.is_main_process:
            smoke_preference_data(settings.num_pairs or 32, seed=seed).save_to_disk(str(path))
        return load_from_disk(str(path))


def lora_config(settings: RunSettings) -> LoraConfig | None:
    """LoRA on all seven projections for the LoRA recipes; None for full fine-tuning.

    No LoRA dropout: ``DPOConfig(disable_dropout=True)``, which TRL's DPO recipes use so that
    policy and reference see the same network, would zero it anyway.
    """
    if settings.recipe == "full":
        return None
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(ALL_PROJECTIONS),
        task_type="CAUSAL_LM",
    )


def device_arguments(recipe: str) -> dict:
    """The training arguments that depend on the machine: mixed precision and the optimiser.

    ``bf16``/``fp16`` follow :func:`compute_dtype`; ``use_cpu`` without CUDA. The optimiser is
    paged AdamW for QLoRA on a GPU, fused AdamW for the other recipes on a GPU, and torch's
    AdamW on a CPU.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    dtype = compute_dtype()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        optim = "adamw_torch"
    elif recipe == "qlora":
        optim = "paged_adamw_32bit"
    else:
        optim = "adamw_torch_fused"
    return {
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu": not on_gpu,
        "optim": optim,
    }


def training_config(settings: RunSettings) -> FocalPOConfig:
    """The :class:`FocalPOConfig` for these settings (resolved first).

    Gradient checkpointing is always on; bf16 or fp16 mixed precision on a GPU
    (:func:`compute_dtype`), fp32 on a CPU. The full recipe precomputes the reference log-probs,
    so no reference model stays in memory. QLoRA uses paged AdamW, as the QLoRA paper does; the
    other recipes fused AdamW on a GPU (no temporary copy of the parameters at its step, which
    torch's default foreach AdamW makes). A checkpoint every ``save_steps`` steps, the last
    ``save_total_limit`` kept. The warm-up is ``warmup_ratio`` of the run, passed as
    ``warmup_steps`` below 1, which transformers 5 reads as a fraction (transformers 4 would
    read it as no warm-up: the Colab cell pins transformers).
    """
    if not isinstance(settings, RunSettings):
        raise TypeError(f"settings must be a RunSettings, got {type(settings).__name__}")
    settings = settings.resolved()
    return FocalPOConfig(
        output_dir=settings.output_dir,
        # Plain Python numbers: RunSettings accepts numpy's too, DPOConfig may not.
        gamma=float(settings.gamma),
        beta=float(settings.beta),
        learning_rate=float(settings.learning_rate),
        max_length=int(settings.max_length),
        per_device_train_batch_size=int(settings.per_device_train_batch_size),
        gradient_accumulation_steps=int(settings.gradient_accumulation_steps),
        num_train_epochs=float(settings.num_train_epochs),
        max_steps=int(settings.max_steps),
        lr_scheduler_type="cosine",
        warmup_steps=float(settings.warmup_ratio),
        **device_arguments(settings.recipe),
        gradient_checkpointing=True,
        precompute_ref_log_probs=settings.recipe == "full",
        # Every parameter of the LoRA recipes' adapter gets a gradient at every step: DDP need
        # not search the graph for unused ones (transformers' default does, with LoRA).
        ddp_find_unused_parameters=False,
        logging_steps=1 if settings.smoke else 10,
        logging_first_step=True,  # step 1 has a known loss, (1/2)**gamma ln 2: a sanity check
        save_strategy="steps",
        save_steps=int(settings.save_steps),
        save_total_limit=int(settings.save_total_limit),
        report_to=[],
        seed=int(settings.seed),
        disable_tqdm=settings.smoke,
    )


def cast_trainable_to_fp32(model: torch.nn.Module) -> int:
    """Cast every trainable parameter to fp32 in place; return how many were cast.

    TRL 1.16 casts the adapter of a 4-bit model to bf16. A bf16 adapter barely moves at a LoRA
    learning rate of 5e-6 (most updates are below bf16's resolution), and fp16 training's loss
    scaler cannot unscale bf16 gradients. Mixed precision keeps computing in 16 bits.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def build_trainer(settings: RunSettings, model, tokenizer, train_dataset) -> FocalPOTrainer:
    """A :class:`FocalPOTrainer`, its trainable parameters in fp32.

    With LoRA the reference is the base with the adapter off; the full recipe precomputes the
    reference log-probs with the untrained policy. Raises ``ValueError`` for a recipe the
    launcher cannot run (:func:`check_launch`).
    """
    settings = settings.resolved()
    check_launch(settings)
    trainer = FocalPOTrainer(
        model=model,
        args=training_config(settings),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(settings),
    )
    cast_trainable_to_fp32(trainer.model)
    return trainer


def train(trainer: FocalPOTrainer):
    """``trainer.train()``, resumed from the newest checkpoint in ``trainer.args.output_dir``.

    A re-run after a disconnect therefore continues where the last checkpoint left off: the
    weights, optimiser and scheduler state, the data order and the log come back from it. A
    run that had already finished returns at once with its log.
    """
    output_dir = Path(trainer.args.output_dir)
    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if trainer.is_world_process_zero():
        print(f"resuming from {checkpoint}" if checkpoint else "no checkpoint: starting at step 0")
    return trainer.train(resume_from_checkpoint=checkpoint)


class ProgressReport(TrainerCallback):
    """Prints the measured seconds per optimiser step and the time left, once ``after`` steps
    have been timed and then at every checkpoint.

    The first step of a run (or of a resumed run) is not timed: it includes one-off work such as
    CUDA kernel selection. ``seconds_per_step`` holds the latest measurement (None before).
    """

    def __init__(self, after: int = 3, print_fn=print) -> None:
        if not _is_int(after) or after < 1:
            raise ValueError(f"after must be an int >= 1, got {after!r}")
        self.after = after
        self.print_fn = print_fn
        self.seconds_per_step: float | None = None
        self._start: tuple[int, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._start is None:
            self._start = (state.global_step, now)
            return
        first_step, first_time = self._start
        timed = state.global_step - first_step
        self.seconds_per_step = (now - first_time) / timed
        at_checkpoint = args.save_steps and state.global_step % args.save_steps == 0
        if (timed == self.after or (timed > self.after and at_checkpoint)) and (
            state.is_world_process_zero
        ):
            left = self.seconds_per_step * (state.max_steps - state.global_step)
            self.print_fn(
                f"step {state.global_step}/{state.max_steps}: {self.seconds_per_step:.2f} s/step "
                f"(measured over {timed} steps), about {left / 3600:.2f} h left"
            )


# An assumption, not a measurement: the share of a GPU's 16-bit peak that a 7B FocalPO step
# reaches. ProgressReport's measured seconds per step replace the estimate it gives.
ASSUMED_MFU = 0.3


def peak_tflops(gpu_name: str) -> float | None:
    """The GPU's 16-bit tensor-core peak from :data:`PEAK_16BIT_TFLOPS`, None if unknown."""
    return next((peak for key, peak in PEAK_16BIT_TFLOPS.items() if key in gpu_name), None)


def estimated_step_seconds(
    config, settings: RunSettings, peak: float, *, mfu: float = ASSUMED_MFU
) -> float:
    """Seconds per optimiser step on one GPU of ``peak`` TFLOP/s, an upper-bound estimate.

    Every sequence is counted at ``max_length`` tokens (chosen and rejected rows: 2 per pair).
    Weight-matmul FLOPs per token, with N the parameters outside the embedding: 8N for every
    recipe, which is 6N (forward and backward) + 2N (the forward pass gradient checkpointing
    recomputes) for full fine-tuning, and 2N + 2N (input gradients; the frozen base gets no
    weight gradients) + 2N (recomputation) + 2N (the adapter-off reference) with LoRA.
    """
    settings = settings.resolved()
    if not _is_real(peak) or peak <= 0:
        raise ValueError(f"peak must be a positive number of TFLOP/s, got {peak!r}")
    if not _is_real(mfu) or not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    n = parameter_count(config) - config.vocab_size * config.hidden_size
    tokens = 2 * settings.pairs_per_step * settings.max_length
    return 8 * n * tokens / (peak * 1e12 * mfu)


def steps_for_budget(hours: float, step_seconds: float) -> int:
    """Optimiser steps that fit in ``hours`` at ``step_seconds`` each (at least 1)."""
    if not _is_real(hours) or hours <= 0:
        raise ValueError(f"hours must be > 0, got {hours!r}")
    if not _is_real(step_seconds) or step_seconds <= 0:
        raise ValueError(f"step_seconds must be > 0, got {step_seconds!r}")
    return max(1, math.floor(hours * 3600 / step_seconds))


def sample_prompts(dataset: Dataset, k: int) -> list[list[dict]]:
    """The first ``k`` prompts of UltraFeedback-style pairs (each conversation minus its answer)."""
    if not _is_int(k) or k <= 0 or k > len(dataset):
        raise ValueError(f"k must be an int in [1, {len(dataset)}], got {k!r}")
    return [dataset[i]["chosen"][:-1] for i in range(k)]


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy completions of chat ``prompts`` (each a list of messages), one string each."""
    was_training = model.training
    model.eval()
    completions = []
    try:
        for messages in prompts:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            completions.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return completions
