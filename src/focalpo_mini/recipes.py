"""One code path for a FocalPO run: a 7B model on GPUs, or the tiny world on a CPU (smoke mode).

The 7B chapter and ``scripts/train_focalpo.py`` both call, in order,
:func:`load_model_and_tokenizer`, :func:`load_preference_data`, :func:`generate_samples`,
:func:`build_trainer` and :func:`train` (which resumes from the last checkpoint). Smoke mode
swaps the hub model and data for local stand-ins and trains for a few steps; every other line
is the same. This module imports ``trl`` and ``peft`` (``pip install "focalpo_mini[trl]"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset, load_dataset, load_from_disk
from peft import LoraConfig
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput

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

# Dense (no sparsity) 16-bit tensor-core peak in TFLOP/s, from the vendors' data sheets: bf16
# where the GPU has it, fp16 on the T4. Keyed by the exact name ``torch.cuda.get_device_name()``
# reports, because models that share a prefix differ: an H100 PCIe is not an H100 SXM, an L40
# is not an L4. A GPU not listed is unknown (:func:`peak_tflops` returns None), never guessed.
PEAK_16BIT_TFLOPS = {
    "Tesla T4": 65.0,
    "NVIDIA A10G": 70.0,
    "NVIDIA L4": 121.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # the SXM module
    "NVIDIA H200": 989.0,
}

# What torch reports for each GPU of ``focalpo_mini.memory.GPUS`` (the A100s and the H100 as
# the SXM modules cloud providers and Colab rent).
DEVICE_NAMES = {
    "T4 16GB": "Tesla T4",
    "L4 24GB": "NVIDIA L4",
    "A100 40GB": "NVIDIA A100-SXM4-40GB",
    "A100 80GB": "NVIDIA A100-SXM4-80GB",
    "H100 80GB": "NVIDIA H100 80GB HBM3",
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
    """Everything that defines a run, as you set it. ``learning_rate=None`` takes the recipe's
    default.

    Defaults follow the TRL documentation and alignment-handbook recipes for 7B DPO (beta 0.01,
    learning rate 5e-6 with LoRA, 5e-7 for full fine-tuning, max_length 1024, 4 pairs x 4
    accumulation steps, 10% warm-up); gamma 0.5 is this library's default (see
    ``focalpo_mini.focalpo_loss``). None of them is the FocalPO paper's: the paper does not state
    its values in any source this library could check.

    A checkpoint is written every ``save_steps`` optimiser steps to ``output_dir``, keeping the
    last ``save_total_limit`` complete ones (older ones are deleted only once the new one is
    complete); :func:`train` resumes from the newest complete one. The folder also records the run's
    plan (:func:`record_run_plan`): a later call with other settings is refused.

    Every field is checked when the settings are made: a wrong type raises ``TypeError`` and a
    value out of range ``ValueError``, each naming the field. :meth:`resolved` gives the values a
    run uses; edit these settings, never a resolved copy, and resolve again.
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

    def __post_init__(self) -> None:
        for name in ("model_id", "dataset_id", "recipe", "output_dir"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {getattr(self, name)!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if not isinstance(self.smoke, bool):
            raise TypeError(f"smoke must be True or False, got {self.smoke!r}")
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
            if not math.isfinite(self.learning_rate) or not 0 < self.learning_rate < 1:
                raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
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

    def resolved(self) -> ResolvedSettings:
        """The values a run uses: smoke mode's overrides and the recipe's learning rate filled in.

        In smoke mode every field of :data:`SMOKE_OVERRIDES` is replaced; a ``UserWarning``
        names each one you had set to something else than its default.
        """
        return ResolvedSettings(self)

    @property
    def pairs_per_step(self) -> int:
        """Preference pairs per optimiser step on one process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


@dataclass(frozen=True)
class ResolvedSettings:
    """The values a run uses, computed from ``user`` (your :class:`RunSettings`) and nothing else.

    Read any setting as an attribute (``resolved.learning_rate``). To change one, use
    :meth:`replace`, which edits your settings and resolves them again: so changing ``recipe``
    also changes the default learning rate, and turning ``smoke`` on applies its overrides.
    """

    user: RunSettings
    values: RunSettings = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.user, RunSettings):
            raise TypeError(f"user must be a RunSettings, got {type(self.user).__name__}")
        values = self.user
        if values.smoke:
            defaults = RunSettings()
            replaced = {
                name: (getattr(values, name), value)
                for name, value in SMOKE_OVERRIDES.items()
                if getattr(values, name) != getattr(defaults, name)
                and getattr(values, name) != value
            }
            if replaced:
                listing = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in replaced.items())
                warnings.warn(
                    f"smoke mode replaces settings you chose: {listing}", UserWarning, stacklevel=3
                )
            values = dataclasses.replace(values, **SMOKE_OVERRIDES)
        if values.learning_rate is None:
            rate = 5e-7 if values.recipe == "full" else 5e-6
            values = dataclasses.replace(values, learning_rate=rate)
        object.__setattr__(self, "values", values)

    def __getattr__(self, name: str):
        # Called only for names that are not ResolvedSettings' own: the settings' values.
        if name in ("user", "values") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.values, name)

    def __repr__(self) -> str:
        return f"ResolvedSettings({self.values!r})"

    def replace(self, **changes) -> ResolvedSettings:
        """Your settings with ``changes``, resolved again."""
        return dataclasses.replace(self.user, **changes).resolved()


def _resolve(settings) -> ResolvedSettings:
    """``settings`` resolved; a TypeError naming ``settings`` for anything else."""
    if isinstance(settings, ResolvedSettings):
        return settings
    if isinstance(settings, RunSettings):
        return settings.resolved()
    raise TypeError(
        f"settings must be a RunSettings or ResolvedSettings, got {type(settings).__name__}"
    )


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
    """One line: the GPU, its memory and compute capability, and the dtypes training will use."""
    dtype = compute_dtype()
    if not torch.cuda.is_available():
        return f"No CUDA GPU: training computes in {dtype} (smoke mode)."
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    native = "native bf16" if native_bf16((major, minor)) else "no native bf16"
    scaler = ", with a loss scaler" if dtype == torch.float16 else ""
    if launcher() == ("deepspeed", 3):
        # DeepSpeed's bf16 mode keeps the parameters in bf16 and an fp32 master copy in the
        # optimiser: cast_trainable_to_fp32's cast does not survive its initialisation.
        storage = "parameters in bf16 with an fp32 master copy in the optimiser (DeepSpeed)"
    else:
        storage = "trainable parameters in torch.float32"
    return (
        f"GPU: {props.name}, {props.total_memory / 1e9:.1f} GB, compute capability "
        f"{major}.{minor} ({native}): mixed precision in {dtype}{scaler}; {storage}."
    )


_TRUE = ("1", "true", "yes", "y", "on", "t")
_FALSE = ("0", "false", "no", "n", "off", "f", "")


def _env_flag(name: str) -> bool:
    """A true/false environment variable, read the way accelerate reads it (``"1"``, ``"true"``,
    ``"yes"``, ...); anything else is a ValueError naming the variable."""
    value = os.environ.get(name, "false").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name} must be true or false (or 1/0), got {value!r}")


def launcher() -> tuple[str | None, int | None]:
    """(``"deepspeed"``, ZeRO stage), (``"fsdp"``, None) or (None, None): what ``accelerate launch``
    set up for this process, read from the environment it passes (``ACCELERATE_USE_DEEPSPEED``,
    ``ACCELERATE_DEEPSPEED_ZERO_STAGE``, ``ACCELERATE_USE_FSDP``). A flag that is not a
    true/false value, or a ZeRO stage that is not 0-3, raises ValueError naming the variable."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
        if stage and stage not in ("0", "1", "2", "3"):
            raise ValueError(
                f"environment variable ACCELERATE_DEEPSPEED_ZERO_STAGE must be 0, 1, 2 or 3, "
                f"got {stage!r}"
            )
        return "deepspeed", int(stage) if stage else None
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp", None
    return None, None


def check_launch(settings: RunSettings | ResolvedSettings) -> None:
    """Refuse the combinations of recipe and launcher this book does not support, before loading.

    - LoRA recipes under ZeRO-3 or FSDP: they shard a model whose few trainable parameters do
      not need it, and the 4-bit base of QLoRA cannot be sharded by them. Use one GPU, or
      ``configs/accelerate/ddp_8gpu.yaml`` for data parallelism.
    - The full recipe under FSDP: it precomputes the reference log-probs, and under FSDP TRL 1.16
      loads a second full model from the hub for that pass. Use ZeRO-3
      (``configs/accelerate/deepspeed_zero3_8gpu.yaml``), where the policy computes them.
    """
    settings = _resolve(settings)
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


# The settings that decide what a run computes. output_dir, save_total_limit and max_new_tokens
# do not, so a run can move folders, keep more checkpoints or sample longer answers.
_NOT_IN_PLAN = ("output_dir", "save_total_limit", "max_new_tokens")
PLAN_FILE = "run_plan.json"


def run_plan(settings: RunSettings | ResolvedSettings) -> dict:
    """What fixes a run when it starts: the resolved settings that decide what it computes (the
    data and how many pairs, the steps and schedule, gamma, beta, the seed, the save interval,
    ...) and the number of processes, which sets the pairs per optimiser step. Plain JSON types.
    """
    settings = _resolve(settings)
    plan = {
        name: getattr(settings, name)
        for name in (f.name for f in dataclasses.fields(RunSettings))
        if name not in _NOT_IN_PLAN
    }
    # Plain Python numbers: the settings accept numpy's too, and JSON keeps these exactly.
    plan = {k: float(v) if _is_real(v) and not _is_int(v) else v for k, v in plan.items()}
    plan = {k: int(v) if _is_int(v) else v for k, v in plan.items()}
    plan["num_processes"] = process_state().num_processes
    return plan


def _plan_differences(recorded: dict, plan: dict) -> list[str]:
    return [
        f"{name} {recorded.get(name)!r} (this call: {plan.get(name)!r})"
        for name in sorted(set(recorded) | set(plan))
        if recorded.get(name) != plan.get(name)
    ]


def check_run_plan(settings: RunSettings | ResolvedSettings) -> dict | None:
    """The plan recorded in ``output_dir`` (None if none yet); ValueError if these settings
    would compute something else, naming every difference and how to start afresh."""
    settings = _resolve(settings)
    path = Path(settings.output_dir) / PLAN_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    differences = _plan_differences(recorded, run_plan(settings))
    if differences:
        raise ValueError(
            f"output_dir {settings.output_dir} holds a run started with other settings: "
            f"{'; '.join(differences)}. To continue that run, use its settings ({path}); to "
            f"start a new run, choose another output_dir (or delete {settings.output_dir})."
        )
    return recorded


def record_run_plan(settings: RunSettings | ResolvedSettings) -> dict:
    """Fix the run's plan: write it to ``output_dir/run_plan.json`` if the folder has none,
    otherwise check these settings against it (:func:`check_run_plan`). Returns the plan."""
    settings = _resolve(settings)
    state = process_state()
    # Every process reads the folder before any process writes to it: they all take one branch.
    state.wait_for_everyone()
    recorded = check_run_plan(settings)
    state.wait_for_everyone()
    if recorded is not None:
        return recorded
    plan = run_plan(settings)
    if state.is_main_process:
        _write_atomically(Path(settings.output_dir) / PLAN_FILE, json.dumps(plan, indent=2))
    state.wait_for_everyone()
    return plan


def _fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename: a reader sees
    the old file or the whole new one, never part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def load_model_and_tokenizer(settings: RunSettings | ResolvedSettings):
    """The policy model and its tokenizer.

    Smoke mode: the tiny world's Llama and tokenizer, built locally. Otherwise
    ``settings.model_id`` (a hub name or a local folder), in 4-bit NF4 with double quantisation
    for ``"qlora"``, in the compute dtype (:func:`compute_dtype`) for ``"lora"``, in fp32 for
    ``"full"``. The model goes on this process's GPU, except for full fine-tuning on several
    processes, where DeepSpeed ZeRO-3 shards and places it. Under ZeRO-3 the training
    arguments are built first, so that the weights are partitioned while they load instead of
    every process holding a full fp32 copy in CPU memory. Settings that differ from the plan
    recorded in ``output_dir`` are refused before anything loads (:func:`check_run_plan`).
    """
    settings = _resolve(settings)
    check_launch(settings)
    check_run_plan(settings)
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


def load_preference_data(settings: RunSettings | ResolvedSettings, split: str = "train") -> Dataset:
    """Training (or ``"test"``) pairs: ``settings.dataset_id`` from the hub, or smoke data.

    ``num_pairs`` keeps the first pairs of the training split (the same ones on every re-run,
    so a resumed run continues on the same data). Smoke data is written once to a folder of
    ``output_dir`` named after its size and seed, through a temporary folder and a rename, and
    read back, so that several processes share one on-disk dataset (TRL's reference
    precomputation fails under DDP with an in-memory dataset); a later call never rewrites a
    folder a returned dataset reads from.
    """
    settings = _resolve(settings)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    check_run_plan(settings)
    if not settings.smoke:
        dataset = load_dataset(settings.dataset_id, split=split)
        if split == "train" and settings.num_pairs is not None:  # a subset to train on
            dataset = dataset.select(range(min(settings.num_pairs, len(dataset))))
        return dataset
    seed = settings.seed if split == "train" else settings.seed + 1
    n = settings.num_pairs or 32
    path = Path(settings.output_dir) / "data" / f"smoke_{split}_n{n}_seed{seed}"
    state = process_state()
    with state.main_process_first():
        if state.is_main_process and not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
            smoke_preference_data(n, seed=seed).save_to_disk(str(temporary / "dataset"))
            os.replace(temporary / "dataset", path)
            temporary.rmdir()
        return load_from_disk(str(path))


def lora_config(settings: RunSettings | ResolvedSettings) -> LoraConfig | None:
    """LoRA on all seven projections for the LoRA recipes; None for full fine-tuning.

    No LoRA dropout: ``DPOConfig(disable_dropout=True)``, which TRL's DPO recipes use so that
    policy and reference see the same network, would zero it anyway.
    """
    settings = _resolve(settings)
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


def training_config(settings: RunSettings | ResolvedSettings) -> FocalPOConfig:
    """The :class:`FocalPOConfig` for these settings (resolved first).

    Gradient checkpointing is always on; bf16 or fp16 mixed precision on a GPU
    (:func:`compute_dtype`), fp32 on a CPU. The full recipe precomputes the reference log-probs,
    so no reference model stays in memory. QLoRA uses paged AdamW, as the QLoRA paper does; the
    other recipes fused AdamW on a GPU (no temporary copy of the parameters at its step, which
    torch's default foreach AdamW makes). A checkpoint every ``save_steps`` steps; the old ones
    are rotated away by :class:`CompleteCheckpoints`, not by transformers (which would delete
    them before the new one is complete). The warm-up is ``warmup_ratio`` of the run, passed as
    ``warmup_steps`` below 1, which transformers 5 reads as a fraction (transformers 4 would
    read it as no warm-up: the Colab cell pins transformers).
    """
    settings = _resolve(settings)
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
        report_to=[],
        seed=int(settings.seed),
        disable_tqdm=settings.smoke,
    )


def cast_trainable_to_fp32(model: torch.nn.Module) -> int:
    """Cast every trainable parameter to fp32 in place; return how many were cast.

    TRL 1.16 casts the adapter of a 4-bit model to bf16. A bf16 adapter barely moves at a LoRA
    learning rate of 5e-6 (most updates are below bf16's resolution), and fp16 training's loss
    scaler cannot unscale bf16 gradients. Mixed precision keeps computing in 16 bits. Under
    DeepSpeed ZeRO-3 (the full recipe on several GPUs) this cast does not last: DeepSpeed's bf16
    mode stores the parameters in bf16 and keeps an fp32 master copy in its optimiser.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


# The file that marks a checkpoint folder complete. Written last, after every other file of the
# folder is synced, it lists each file with its size, so that a copy whose files arrived out of
# order (a cloud drive uploading in the background) is not taken for complete either.
COMPLETE_MARKER = "checkpoint_complete.json"


def _checkpoint_files(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER and not path.name.startswith(".")
    }


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """None if the checkpoint ``folder`` is complete, else why not (in words)."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER}: the save did not finish"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARKER} is unreadable"
    present = _checkpoint_files(folder)
    for name, size in listed.items():
        if name not in present:
            return f"{name} is missing"
        if present[name] != size:
            return f"{name} has {present[name]} bytes, {size} were written"
    return None


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``output_dir`` (:func:`incomplete_reason`), or None."""
    return next(
        (f for f in reversed(checkpoints(output_dir)) if incomplete_reason(f) is None), None
    )


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once it is safely written, then keeps the newest ``keep``.

    Syncs every file of the new ``checkpoint-<step>`` folder to disk, calls ``flush`` (if given),
    writes :data:`COMPLETE_MARKER` through a synced temporary file and a rename, and calls
    ``flush`` again. On Colab, ``flush`` is where Google Drive's background upload is forced to
    finish, so that the marker reaches Drive after the files it lists. Only then are checkpoints
    beyond the newest ``keep`` deleted, oldest step first: a save cut off at any moment leaves
    the previous complete checkpoint in place. Every process waits for the others first (each
    writes its own shards under ZeRO-3); the main process writes and deletes.
    """

    def __init__(self, flush: Callable[[], None] | None = None, *, keep: int = 2) -> None:
        if flush is not None and not callable(flush):
            raise TypeError(f"flush must be a function or None, got {flush!r}")
        if not _is_int(keep) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.flush = flush
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        process = process_state()
        process.wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            files = _checkpoint_files(folder)
            for name in files:
                _fsync_path(folder / name)
            for sub in {folder / name for name in files}:
                _fsync_path(sub.parent)
            if self.flush is not None:
                self.flush()
            _write_atomically(folder / COMPLETE_MARKER, json.dumps({"files": files}, indent=1))
            if self.flush is not None:
                self.flush()
            for old in checkpoints(args.output_dir)[: -self.keep]:
                shutil.rmtree(old)
        process.wait_for_everyone()


def build_trainer(
    settings: RunSettings | ResolvedSettings,
    model,
    tokenizer,
    train_dataset,
    *,
    flush: Callable[[], None] | None = None,
) -> FocalPOTrainer:
    """A :class:`FocalPOTrainer`, its trainable parameters in fp32, that marks every checkpoint
    complete once written (:class:`CompleteCheckpoints`, with ``flush``).

    With LoRA the reference is the base with the adapter off; the full recipe precomputes the
    reference log-probs with the untrained policy. Raises ``ValueError`` for a recipe the
    launcher cannot run (:func:`check_launch`) and for settings that differ from the plan the
    output folder records; a new folder gets these settings' plan (:func:`record_run_plan`).
    """
    settings = _resolve(settings)
    check_launch(settings)
    record_run_plan(settings)
    trainer = FocalPOTrainer(
        model=model,
        args=training_config(settings),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(settings),
        callbacks=[CompleteCheckpoints(flush, keep=settings.save_total_limit)],
    )
    cast_trainable_to_fp32(trainer.model)
    return trainer


def train(trainer: FocalPOTrainer) -> TrainOutput:
    """``trainer.train()``, resumed from the newest complete checkpoint in its output folder.

    A re-run after a disconnect therefore continues where the last complete checkpoint left
    off: the weights, optimiser and scheduler state, the data order and the log come back from
    it. A newer checkpoint that is incomplete (a save cut off, a file lost) is named, removed,
    and skipped. A run that had already finished trains nothing: the final checkpoint's weights
    and log are loaded and returned at once (``training_loss`` is then the mean logged loss).
    """
    output_dir = Path(trainer.args.output_dir)
    checkpoint = last_complete_checkpoint(output_dir)
    main = trainer.is_world_process_zero()
    if main:
        for folder in checkpoints(output_dir):
            reason = incomplete_reason(folder)
            if reason is not None:
                print(f"skipping {folder.name}: incomplete ({reason}); removed")
                shutil.rmtree(folder)
    trainer.accelerator.wait_for_everyone()
    if checkpoint is None:
        if main:
            print("no complete checkpoint: starting at step 0")
        return trainer.train()
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    if state.max_steps and state.global_step >= state.max_steps:
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = state
        if main:
            print(f"the run finished at step {state.global_step}: loaded {checkpoint.name}")
        losses = [e["loss"] for e in state.log_history if "loss" in e]
        mean = sum(losses) / len(losses) if losses else float("nan")
        return TrainOutput(state.global_step, mean, {"already_finished": True})
    if main:
        print(f"resuming from {checkpoint.name} (step {state.global_step} of {state.max_steps})")
    return trainer.train(resume_from_checkpoint=str(checkpoint))


def sessions_left(steps_left: int, seconds_per_step: float, budget_hours: float) -> int:
    """Sessions of ``budget_hours`` that ``steps_left`` steps of ``seconds_per_step`` need."""
    if not _is_int(steps_left) or steps_left < 0:
        raise ValueError(f"steps_left must be an int >= 0, got {steps_left!r}")
    for name, value in (("seconds_per_step", seconds_per_step), ("budget_hours", budget_hours)):
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    steps_per_session = max(1, math.floor(budget_hours * 3600 / seconds_per_step))
    return math.ceil(steps_left / steps_per_session)


class ProgressReport(TrainerCallback):
    """Prints the measured seconds per optimiser step and the time left, once ``after`` steps
    have been timed and then at every checkpoint; with ``budget_hours``, also ends the session
    cleanly before that much training time has passed.

    The first step of a session is not timed: it includes one-off work such as CUDA kernel
    selection. ``seconds_per_step`` holds the latest measurement (None before).

    The budget: after each step, if one more step and a save (the longest save measured so far,
    at least ``reserve_seconds``) would end past ``budget_hours`` of training in this session,
    the step is saved (as a complete checkpoint) and training stops; :func:`train` continues
    from there in the next session. At the end of a session it prints the steps left and the
    sessions of ``budget_hours`` they need at the measured speed. One process only: under
    several processes each would measure its own clock.
    """

    def __init__(
        self,
        after: int = 3,
        print_fn=print,
        *,
        budget_hours: float | None = None,
        reserve_seconds: float = 300.0,
    ) -> None:
        if not _is_int(after) or after < 1:
            raise ValueError(f"after must be an int >= 1, got {after!r}")
        if budget_hours is not None and (
            not _is_real(budget_hours) or not math.isfinite(budget_hours) or budget_hours <= 0
        ):
            raise ValueError(
                f"budget_hours must be a finite number > 0 or None, got {budget_hours!r}"
            )
        if not _is_real(reserve_seconds) or not 0 <= reserve_seconds < math.inf:
            raise ValueError(
                f"reserve_seconds must be a finite number >= 0, got {reserve_seconds!r}"
            )
        self.after = after
        self.print_fn = print_fn
        self.budget_hours = budget_hours
        self.reserve_seconds = float(reserve_seconds)
        self.seconds_per_step: float | None = None
        self.stopped_for_budget = False
        self._start: tuple[int, float] | None = None
        self._begin = 0.0
        self._step_end = 0.0
        self._save_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.budget_hours is not None and args.world_size > 1:
            raise ValueError("budget_hours needs a single process; this launch has several")
        self._start = None
        self._begin = time.perf_counter()
        self.stopped_for_budget = False

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._step_end = now
        if self._start is None:
            self._start = (state.global_step, now)
        else:
            first_step, first_time = self._start
            timed = state.global_step - first_step
            self.seconds_per_step = (now - first_time) / timed
            at_checkpoint = args.save_steps and state.global_step % args.save_steps == 0
            if (timed == self.after or (timed > self.after and at_checkpoint)) and (
                state.is_world_process_zero
            ):
                left = self.seconds_per_step * (state.max_steps - state.global_step)
                self.print_fn(
                    f"step {state.global_step}/{state.max_steps}: {self.seconds_per_step:.2f} "
                    f"s/step (measured over {timed} steps), about {left / 3600:.2f} h left"
                )
        if self.budget_hours is None or state.global_step >= state.max_steps:
            return
        step_s = self.seconds_per_step or (now - self._begin)
        reserve = max(self.reserve_seconds, self._save_seconds)
        if now - self._begin + step_s + reserve > self.budget_hours * 3600:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_for_budget = True

    def on_save(self, args, state, control, **kwargs):
        self._save_seconds = max(self._save_seconds, time.perf_counter() - self._step_end)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        left = state.max_steps - state.global_step
        if left <= 0:
            self.print_fn(f"the run is complete: step {state.global_step}/{state.max_steps}")
            return
        line = f"session ends at step {state.global_step}/{state.max_steps}: {left} steps left"
        if self.budget_hours is not None:
            step_s = self.seconds_per_step or (self._step_end - self._begin)
            sessions = sessions_left(left, step_s, self.budget_hours)
            line += (
                f", about {left * step_s / 3600:.2f} h at {step_s:.2f} s/step: {sessions} more "
                f"session(s) of {self.budget_hours:g} h; run the page again to continue"
            )
        self.print_fn(line)


def model_flops_per_token(config) -> int:
    """Model FLOPs per trained token: 6N, with N the parameters outside the embedding.

    This is model FLOPs utilisation's numerator as PaLM defines it (Chowdhery et al. 2022):
    forward (2N) and backward (4N), with no recomputation counted. It is the same 6N for every
    recipe here: full fine-tuning is 2N + 4N; LoRA is 2N forward, 2N for the input gradients
    (the frozen base gets no weight gradients) and 2N for the adapter-off reference's forward
    pass. The forward pass that gradient checkpointing repeats (another 2N) is overhead, not
    model work, and is left out, so an MFU of x means x of the peak went into the 6N.
    """
    return 6 * (parameter_count(config) - config.vocab_size * config.hidden_size)


# An assumption, not a measurement: the model FLOPs utilisation (:func:`model_flops_per_token`)
# that a 7B FocalPO step reaches. ProgressReport's measured seconds per step replace the
# estimate it gives after the first steps of a run.
ASSUMED_MFU = 0.15


def peak_tflops(gpu_name: str) -> float | None:
    """The 16-bit tensor-core peak of the GPU ``torch.cuda.get_device_name()`` calls
    ``gpu_name`` (:data:`PEAK_16BIT_TFLOPS`, exact names only); None if unknown."""
    if not isinstance(gpu_name, str):
        raise TypeError(f"gpu_name must be a str, got {gpu_name!r}")
    return PEAK_16BIT_TFLOPS.get(gpu_name.strip())


def estimated_step_seconds(
    config, settings: RunSettings | ResolvedSettings, peak: float, *, mfu: float = ASSUMED_MFU
) -> float:
    """Seconds per optimiser step on one GPU of ``peak`` TFLOP/s at model FLOPs utilisation
    ``mfu``: :func:`model_flops_per_token` x tokens per step / (peak x mfu).

    Every sequence is counted at ``max_length`` tokens (chosen and rejected rows: 2 per pair),
    an upper bound.
    """
    settings = _resolve(settings)
    if not _is_real(peak) or not math.isfinite(peak) or peak <= 0:
        raise ValueError(f"peak must be a positive number of TFLOP/s, got {peak!r}")
    if not _is_real(mfu) or not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    tokens = 2 * settings.pairs_per_step * settings.max_length
    return model_flops_per_token(config) * tokens / (peak * 1e12 * mfu)


def steps_for_budget(hours: float, step_seconds: float) -> int:
    """Optimiser steps that fit in ``hours`` at ``step_seconds`` each (at least 1)."""
    if not _is_real(hours) or not math.isfinite(hours) or hours <= 0:
        raise ValueError(f"hours must be a finite number > 0, got {hours!r}")
    if not _is_real(step_seconds) or not math.isfinite(step_seconds) or step_seconds <= 0:
        raise ValueError(f"step_seconds must be a finite number > 0, got {step_seconds!r}")
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
