"""One code path for a FocalPO run: a 7B model on GPUs, or the tiny world on a CPU (smoke mode).

The 7B chapter and ``scripts/train_focalpo.py`` both call, in order,
:func:`load_model_and_tokenizer`, :func:`load_preference_data`, :func:`generate_samples`,
:func:`build_trainer` and ``trainer.train()``. Smoke mode swaps the hub model and data for local
stand-ins and trains for a few steps; every other line is the same. This module imports ``trl``
and ``peft`` (``pip install "focalpo_mini[trl]"``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset, load_dataset, load_from_disk
from peft import LoraConfig

from focalpo_mini.data import make_preference_dataset
from focalpo_mini.memory import ALL_PROJECTIONS, RECIPES
from focalpo_mini.tiny import make_model, make_tokenizer
from focalpo_mini.trl import FocalPOConfig, FocalPOTrainer

# What smoke mode replaces, and with what. Applied by ``RunSettings.resolved()``.
SMOKE_OVERRIDES = {
    "max_length": 64,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_steps": 4,
    "num_pairs": 32,
    # The tiny model starts from random weights; at 7B-scale learning rates it would not move.
    "learning_rate": 1e-3,
    "max_new_tokens": 12,
}


@dataclass(frozen=True)
class RunSettings:
    """Everything that defines a run. ``learning_rate=None`` takes the recipe's default.

    Defaults follow the TRL documentation and alignment-handbook recipes for 7B DPO (beta 0.01,
    learning rate 5e-6 with LoRA, 5e-7 for full fine-tuning, max_length 1024, 4 pairs x 4
    accumulation steps); gamma 0.5 is this library's default (see ``focalpo_mini.focalpo_loss``).
    None of them is the FocalPO paper's: the paper does not state its values in any source
    this library could check.
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
    lora_r: int = 16
    lora_alpha: int = 32
    max_new_tokens: int = 128
    output_dir: str = "focalpo-run"
    seed: int = 42
    is_resolved: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0 or None, got {self.learning_rate}")
        if self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")

    def resolved(self) -> RunSettings:
        """These settings with smoke mode's overrides and the recipe's learning rate filled in.

        Resolving twice changes nothing, so a resolved copy can be edited (``dataclasses.replace``)
        and passed on.
        """
        if self.is_resolved:
            return self
        settings = dataclasses.replace(self, **SMOKE_OVERRIDES) if self.smoke else self
        if settings.learning_rate is None:
            rate = 5e-7 if settings.recipe == "full" else 5e-6
            settings = dataclasses.replace(settings, learning_rate=rate)
        return dataclasses.replace(settings, is_resolved=True)


def _compute_dtype() -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs (T4), fp32 on a CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model_and_tokenizer(settings: RunSettings):
    """The policy model and its tokenizer.

    Smoke mode: the tiny world's Llama and tokenizer, built locally (no quantisation, since
    bitsandbytes needs a GPU). Otherwise ``settings.model_id`` from the hub, in 4-bit NF4 with
    double quantisation for ``"qlora"``, the compute dtype for ``"lora"``, fp32 for ``"full"``.
    The model goes on this process's GPU, except for full fine-tuning on several processes,
    where DeepSpeed ZeRO-3 or FSDP shards and places it.
    """
    if settings.smoke:
        tokenizer = make_tokenizer()
        return make_model(tokenizer, seed=settings.seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = _compute_dtype()
    # Full fine-tuning keeps fp32 weights (the optimiser updates them) and computes in autocast.
    kwargs: dict = {"dtype": torch.float32 if settings.recipe == "full" else dtype}
    state = process_state()
    # Full fine-tuning on several processes is sharded by DeepSpeed/FSDP, which place the weights.
    if torch.cuda.is_available() and (settings.recipe != "full" or state.num_processes == 1):
        kwargs["device_map"] = {"": state.local_process_index}
    if settings.recipe == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(settings.model_id, **kwargs)
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

    Smoke data is written to ``output_dir`` and read back, so that several processes share one
    on-disk dataset: TRL's reference precomputation fails under DDP with an in-memory dataset.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
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
    """LoRA on all seven projections for the LoRA recipes; None for full fine-tuning."""
    if settings.recipe == "full":
        return None
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0 if settings.smoke else 0.05,
        target_modules=list(ALL_PROJECTIONS),
        task_type="CAUSAL_LM",
    )


def training_config(settings: RunSettings) -> FocalPOConfig:
    """The :class:`FocalPOConfig` for these (resolved) settings.

    Gradient checkpointing is always on; bf16 or fp16 mixed precision on a GPU, fp32 on a CPU.
    The full recipe precomputes the reference log-probs, so no reference model stays in memory.
    QLoRA uses paged AdamW, as the QLoRA paper does.
    """
    settings = settings.resolved()
    dtype = _compute_dtype()
    on_gpu = torch.cuda.is_available()
    return FocalPOConfig(
        output_dir=settings.output_dir,
        gamma=settings.gamma,
        beta=settings.beta,
        learning_rate=settings.learning_rate,
        max_length=settings.max_length,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # a float below 1 is a fraction of the training steps
        optim="paged_adamw_32bit" if on_gpu and settings.recipe == "qlora" else "adamw_torch",
        gradient_checkpointing=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not on_gpu,
        precompute_ref_log_probs=settings.recipe == "full",
        logging_steps=1 if settings.smoke else 10,
        logging_first_step=True,  # step 1 has a known loss, (1/2)**gamma ln 2: a sanity check
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        disable_tqdm=settings.smoke,
    )


def build_trainer(settings: RunSettings, model, tokenizer, train_dataset) -> FocalPOTrainer:
    """A :class:`FocalPOTrainer`. With LoRA the reference is the base with the adapter off."""
    settings = settings.resolved()
    args = training_config(settings)
    return FocalPOTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(settings),
    )


def sample_prompts(dataset: Dataset, k: int) -> list[list[dict]]:
    """The first ``k`` prompts of UltraFeedback-style pairs (each conversation minus its answer)."""
    if k <= 0 or k > len(dataset):
        raise ValueError(f"k must be in [1, {len(dataset)}], got {k}")
    return [dataset[i]["chosen"][:-1] for i in range(k)]


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy completions of chat ``prompts`` (each a list of messages), one string each."""
    was_training = model.training
    model.eval()
    completions = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        completions.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return completions
