"""How much GPU memory a FocalPO run needs: a plan computed from a model's config, for each recipe.

``memory_plan(config, "qlora", max_length=1024, batch_size=4)`` adds up weights, trainable
parameters, gradients, optimizer state and activations; ``fit_table`` says which GPUs hold it.
Every number is an estimate from the assumptions in :func:`memory_plan`'s docstring, not a
measurement: ``benchmarks/gpu_7b_step.py`` measures the real peak.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

RECIPES = ("qlora", "lora", "full")

# Linear layers of a Llama/Mistral decoder layer: LoRA "on all projections" targets all seven.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Mistral-7B's architecture: the published config.json of mistralai/Mistral-7B-v0.1, which
# HuggingFaceH4/mistral-7b-sft-beta (the book's GPU model) fine-tunes without changing it.
# ``transformers.MistralConfig(**MISTRAL_7B_SHAPE)`` builds it with no download.
MISTRAL_7B_SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}

# GPU name -> (memory in GB as sold, CUDA compute capability). GB = 1e9 bytes, as the vendors
# count. The capability decides the training dtype (see :func:`native_bf16`), not the memory.
GPUS = {
    "T4 16GB": (16, (7, 5)),
    "L4 24GB": (24, (8, 9)),
    "A100 40GB": (40, (8, 0)),
    "A100 80GB": (80, (8, 0)),
    "H100 80GB": (80, (9, 0)),
}

# Architectures whose decoder layer is the one counted here: seven projections, two RMSNorms.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Config fields that mark a mixture-of-experts model, whose MLP this module does not count.
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")

# Part of a GPU's memory a plan may use; the rest is left for the CUDA context, the allocator's
# fragmentation and temporary buffers the plan does not count.
USABLE_FRACTION = 0.9

_GB = 1e9
_BF16 = 2  # bytes per value
_FP32 = 4
# NF4 with double quantisation (QLoRA): 4 bits per weight, one 8-bit absmax per block of 64
# weights, and one fp32 constant per 256 of those absmax values.
_NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)
# AdamW keeps two fp32 moments per trainable parameter (the paged variant pages them, same size).
_ADAM_BYTES = 2 * _FP32


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this CUDA compute capability computes in bf16 natively (Ampere, 8.0, on).

    Older GPUs (a T4 is 7.5) only emulate bf16, without tensor cores, although
    ``torch.cuda.is_bf16_supported()`` says True there by default (``including_emulation=True``).
    """
    if (
        not isinstance(capability, tuple)
        or len(capability) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in capability)
    ):
        raise TypeError(f"capability must be a (major, minor) tuple of ints, got {capability!r}")
    return capability >= (8, 0)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of one training recipe, in GB (1e9 bytes).

    Attributes:
        recipe: ``"qlora"``, ``"lora"`` or ``"full"``.
        num_gpus: GPUs the model states are sharded over (ZeRO-3/FSDP; 1 for the LoRA recipes).
        weights: the model's weights as stored during training (4-bit, bf16 or fp32).
        reference: a separate reference model (0 when the adapter-off base or precomputed
            log-probs serve as the reference).
        gradients: gradients of the trainable parameters.
        optimizer: AdamW's two moments.
        activations: tensors kept for the backward pass, for chosen and rejected sequences.
        trainable_params: number of trainable parameters (not GB).
    """

    recipe: str
    num_gpus: int
    weights: float
    reference: float
    gradients: float
    optimizer: float
    activations: float
    trainable_params: int

    @property
    def total(self) -> float:
        """Sum of all parts, in GB per GPU."""
        return self.weights + self.reference + self.gradients + self.optimizer + self.activations


def _shape(config) -> dict[str, int]:
    """The numbers a Llama/Mistral-style config determines memory by."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {
        "vocab": config.vocab_size,
        "hidden": hidden,
        "intermediate": config.intermediate_size,
        "layers": config.num_hidden_layers,
        "q_dim": heads * head_dim,
        "kv_dim": kv_heads * head_dim,
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
        "attention_bias": bool(getattr(config, "attention_bias", False)),
        # Qwen2 always has biases on q, k and v (not o), with no config field for them.
        "qkv_bias": getattr(config, "model_type", None) == "qwen2",
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
    }


def _projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer in one decoder layer."""
    s = _shape(config)
    h, i, q, kv = s["hidden"], s["intermediate"], s["q_dim"], s["kv_dim"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _check_config(config) -> None:
    """Refuse configs whose parameters this module would count wrongly."""
    needed = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [name for name in needed if not hasattr(config, name)]
    if missing:
        raise TypeError(
            f"config must be a Llama/Mistral-style transformers config; missing {missing}"
        )
    moe = [name for name in _MOE_FIELDS if getattr(config, name, None)]
    if moe:
        raise ValueError(
            f"config is a mixture-of-experts model ({', '.join(moe)} set); this plan counts one "
            f"dense MLP per layer and would undercount its experts: use a dense "
            f"{'/'.join(SUPPORTED_MODEL_TYPES)} config"
        )
    model_type = getattr(config, "model_type", None)
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}"
        )
    for name in needed:
        _positive_int(f"config.{name}", getattr(config, name))
    for name in ("num_key_value_heads", "head_dim"):
        if getattr(config, name, None) is not None:
            _positive_int(f"config.{name}", getattr(config, name))


def linear_parameter_count(config) -> int:
    """Parameters in the decoder layers' linear projections (the part QLoRA quantises)."""
    _check_config(config)
    s = _shape(config)
    per_layer = sum(fan_in * fan_out for fan_in, fan_out in _projection_shapes(config).values())
    if s["attention_bias"]:
        per_layer += s["q_dim"] + 2 * s["kv_dim"] + s["hidden"]
    elif s["qkv_bias"]:
        per_layer += s["q_dim"] + 2 * s["kv_dim"]
    if s["mlp_bias"]:
        per_layer += 2 * s["intermediate"] + s["hidden"]
    return s["layers"] * per_layer


def parameter_count(config) -> int:
    """Total parameters of a Llama, Mistral or Qwen2 ``*ForCausalLM`` built from ``config``.

    Embedding (V x H), per layer the seven projections (with their biases, if any) and two
    RMSNorm weights (H each), the final norm (H), and the LM head (H x V) unless it is tied to
    the embedding. Mixture-of-experts configs (Mixtral, Qwen2-MoE, ...) and other architectures
    are refused with a ValueError rather than counted wrongly.

    >>> from transformers import MistralConfig
    >>> parameter_count(MistralConfig())  # Mistral-7B's shape
    7241732096
    """
    _check_config(config)
    s = _shape(config)
    embedding = s["vocab"] * s["hidden"]
    norms = (2 * s["layers"] + 1) * s["hidden"]
    lm_head = 0 if s["tied"] else embedding
    return embedding + linear_parameter_count(config) + norms + lm_head


def lora_parameter_count(config, *, r: int, target_modules=ALL_PROJECTIONS) -> int:
    """Trainable parameters of LoRA with rank ``r`` on ``target_modules`` of every decoder layer.

    A LoRA pair on a linear layer (in -> out) adds A (r x in) and B (out x r): r (in + out). A
    module named twice is counted once, as PEFT adapts it once.
    """
    _check_config(config)
    _positive_int("r", r)
    if isinstance(target_modules, str) or not all(isinstance(m, str) for m in target_modules):
        raise TypeError(f"target_modules must be a list of module names, got {target_modules!r}")
    shapes = _projection_shapes(config)
    unknown = sorted(set(target_modules) - set(shapes))
    if unknown:
        raise ValueError(f"target_modules must be among {list(shapes)}, got unknown {unknown}")
    per_layer = sum(r * sum(shapes[name]) for name in set(target_modules))
    return _shape(config)["layers"] * per_layer


def layer_activation_bytes(config, *, max_length: int, batch_size: int) -> int:
    """Bytes autograd saves for the backward pass of one decoder layer, for one micro-batch of
    ``batch_size`` pairs (``2 * batch_size`` sequences of ``max_length`` tokens) in bf16.

    Counted tensor by tensor, as ``tests/test_memory.py`` measures them on a small Mistral with
    ``torch.autograd.graph.saved_tensors_hooks`` (SDPA attention, no T x T matrix), per token:

    - six H-wide bf16 tensors: each RMSNorm's normalised input and output (2 x 2), the rotated
      query and the attention output;
    - two KV-wide bf16 tensors: the rotated key and the value;
    - four I-wide bf16 tensors in the MLP: gate, activated gate, up, and their product;
    - each RMSNorm's input in fp32 (2 x H x 4 bytes; RMSNorm computes in fp32) and its
      reciprocal root mean square (2 x 4 bytes);
    - the attention's log-sum-exp, one fp32 value per head;

    and, once per sequence position, the rotary cosine and sine (2 x head_dim in bf16), which
    all sequences of the batch share.
    """
    _positive_int("max_length", max_length)
    _positive_int("batch_size", batch_size)
    _check_config(config)
    s = _shape(config)
    h, kv, i = s["hidden"], s["kv_dim"], s["intermediate"]
    heads = config.num_attention_heads
    head_dim = s["q_dim"] // heads
    per_token = _BF16 * (6 * h + 2 * kv + 4 * i) + _FP32 * (2 * h + 2 + heads)
    tokens = 2 * batch_size * max_length
    return per_token * tokens + 2 * head_dim * _BF16 * max_length


def activation_bytes(
    config, *, max_length: int, batch_size: int, gradient_checkpointing: bool
) -> float:
    """Bytes of activations kept for the backward pass of one micro-batch, at their peak.

    DPO-style training runs chosen and rejected sequences together, so a micro-batch of
    ``batch_size`` pairs is ``2 * batch_size`` sequences of up to ``max_length`` tokens.
    Without gradient checkpointing every layer keeps :func:`layer_activation_bytes`. With it,
    only each layer's bf16 input (H per token) is kept, plus one layer's full set while that
    layer is recomputed. Either way one more layer's worth is added for the backward pass's
    transients (the gradients of that layer's activations, about as large): an allowance, not a
    measurement. The fused LM head of TRL scores tokens in tiles, so the (tokens x vocab) logits
    never exist at once and are not counted.
    """
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing must be a bool, got {gradient_checkpointing!r}")
    per_layer = layer_activation_bytes(config, max_length=max_length, batch_size=batch_size)
    s = _shape(config)
    if gradient_checkpointing:
        inputs = s["layers"] * s["hidden"] * 2 * batch_size * max_length * _BF16
        return inputs + 2 * per_layer
    return (s["layers"] + 1) * per_layer


def checkpoint_gb(
    config,
    recipe: str,
    *,
    lora_r: int = 16,
    num_gpus: int = 1,
    save_only_model: bool = False,
) -> float:
    """Disk one training checkpoint takes, in GB, for ``recipe``.

    - LoRA recipes: the fp32 adapter (4 bytes a trainable parameter) and AdamW's two fp32
      moments (8): 12 bytes per adapter parameter; the base model is not saved.
    - ``"full"`` on one GPU: the fp32 model (4 bytes a parameter) and AdamW's moments (8).
    - ``"full"`` over ``num_gpus`` > 1 with DeepSpeed ZeRO-3: the consolidated 16-bit model
      (2 bytes; ``zero3_save_16bit_model``) and the optimiser's fp32 master weights and moments
      (12), about 14 bytes a parameter in all, whatever the number of GPUs.

    ``save_only_model`` keeps only the model (the 16-bit one under ZeRO-3), which cannot be
    resumed from. While a new checkpoint is written before the oldest is rotated away, a run
    with ``save_total_limit`` k holds k + 1 of them.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    _positive_int("num_gpus", num_gpus)
    if not isinstance(save_only_model, bool):
        raise TypeError(f"save_only_model must be a bool, got {save_only_model!r}")
    if recipe != "full":
        adapter = lora_parameter_count(config, r=_positive_int("lora_r", lora_r))
        return adapter * (_FP32 if save_only_model else _FP32 + _ADAM_BYTES) / _GB
    total = parameter_count(config)
    model = _BF16 if num_gpus > 1 else _FP32
    optimizer = 0 if save_only_model else (_FP32 + _ADAM_BYTES if num_gpus > 1 else _ADAM_BYTES)
    return total * (model + optimizer) / _GB


def memory_plan(
    config,
    recipe: str,
    *,
    max_length: int,
    batch_size: int,
    gradient_checkpointing: bool = True,
    lora_r: int = 16,
    num_gpus: int = 1,
    precompute_ref_log_probs: bool | None = None,
) -> MemoryPlan:
    """Estimated per-GPU memory of FocalPO training with ``recipe``.

    Recipes and their assumptions:

    - ``"qlora"``: linear layers in 4-bit NF4 with double quantisation; embedding, LM head and
      norms in 16 bits (bf16, or fp16 on a GPU without bf16). LoRA of rank ``lora_r`` on all
      seven projections, in fp32 (TRL 1.16 casts it to bf16, and
      :func:`focalpo_mini.recipes.build_trainer` casts it back: a bf16 adapter at lr 5e-6 barely
      moves), fp32 gradients; paged AdamW keeps two fp32 moments. The reference is the base with
      the adapter switched off: no second model.
    - ``"lora"``: a 16-bit base; the adapter in fp32, fp32 gradients, fused AdamW (no extra copy
      of the parameters at its step, unlike the default foreach implementation).
    - ``"full"`` on one GPU: fp32 weights and gradients with bf16 autocast, two fp32 AdamW
      moments: 16 bytes per parameter. Fused AdamW: the default foreach AdamW would add about
      one more copy of the parameters at its step.
    - ``"full"`` over ``num_gpus`` > 1 (DeepSpeed ZeRO-3 in bf16): bf16 weights and gradients
      (2 + 2 bytes) and, in the optimiser, an fp32 master copy and two fp32 moments (12 bytes):
      the same 16 bytes per parameter, ZeRO's mixed-precision count (Rajbhandari et al. 2020),
      sharded over ``num_gpus``.
    - A live reference model costs another 4 bytes per parameter on one GPU (2 under ZeRO-3),
      also sharded, unless its log-probs are precomputed before training, which is this book's
      default for the full recipe (``precompute_ref_log_probs=None`` means: True for
      ``"full"``; the LoRA recipes never need a separate reference).

    Activations come from :func:`activation_bytes` and are not sharded. Not counted: the CUDA
    context, allocator fragmentation, temporary buffers (a dequantised weight, communication
    buckets); :data:`USABLE_FRACTION` leaves room for them.

    Args:
        config: a transformers ``LlamaConfig`` or ``MistralConfig`` (or the same fields).
        recipe: one of :data:`RECIPES`.
        max_length: tokens per sequence (prompt + completion), as ``DPOConfig.max_length``.
        batch_size: preference pairs per GPU per micro-batch.
        gradient_checkpointing: recompute activations in the backward pass.
        lora_r: LoRA rank (LoRA recipes only).
        num_gpus: GPUs the full recipe shards over; must be 1 for the LoRA recipes.
        precompute_ref_log_probs: see above.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    num_gpus = _positive_int("num_gpus", num_gpus)
    lora_r = _positive_int("lora_r", lora_r)
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing must be a bool, got {gradient_checkpointing!r}")
    if precompute_ref_log_probs is not None and not isinstance(precompute_ref_log_probs, bool):
        raise TypeError(
            "precompute_ref_log_probs must be True, False or None, "
            f"got {precompute_ref_log_probs!r}"
        )
    if recipe != "full" and num_gpus != 1:
        raise ValueError(f"num_gpus must be 1 for recipe {recipe!r} (one GPU), got {num_gpus}")
    total_params = parameter_count(config)
    activations = activation_bytes(
        config,
        max_length=max_length,
        batch_size=batch_size,
        gradient_checkpointing=gradient_checkpointing,
    )
    if recipe == "full":
        precompute = True if precompute_ref_log_probs is None else precompute_ref_log_probs
        shard = total_params / num_gpus
        # One GPU: fp32 weights and gradients. ZeRO-3: bf16 ones, the fp32 master copy in the
        # optimiser.
        weight_bytes = _FP32 if num_gpus == 1 else _BF16
        optimizer_bytes = _ADAM_BYTES if num_gpus == 1 else _FP32 + _ADAM_BYTES
        return MemoryPlan(
            recipe=recipe,
            num_gpus=num_gpus,
            weights=shard * weight_bytes / _GB,
            reference=0.0 if precompute else shard * weight_bytes / _GB,
            gradients=shard * weight_bytes / _GB,
            optimizer=shard * optimizer_bytes / _GB,
            activations=activations / _GB,
            trainable_params=total_params,
        )
    linear = linear_parameter_count(config)
    other = total_params - linear
    if recipe == "qlora":
        base = linear * _NF4_BITS_PER_WEIGHT / 8 + other * _BF16
    else:
        base = total_params * _BF16
    adapter = lora_parameter_count(config, r=lora_r)
    return MemoryPlan(
        recipe=recipe,
        num_gpus=1,
        weights=(base + adapter * _FP32) / _GB,
        reference=0.0,
        gradients=adapter * _FP32 / _GB,
        optimizer=adapter * _ADAM_BYTES / _GB,
        activations=activations / _GB,
        trainable_params=adapter,
    )


def fits(plan: MemoryPlan, gpu: str) -> bool:
    """Whether ``plan`` fits in :data:`USABLE_FRACTION` of ``gpu`` (a key of :data:`GPUS`)."""
    if not isinstance(plan, MemoryPlan):
        raise TypeError(f"plan must be a MemoryPlan (from memory_plan), got {plan!r}")
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {list(GPUS)}, got {gpu!r}")
    return plan.total <= USABLE_FRACTION * GPUS[gpu][0]


def fit_table(
    config,
    *,
    max_length: int,
    batch_size: int,
    gradient_checkpointing: bool = True,
    lora_r: int = 16,
    full_num_gpus: int = 8,
    full_batch_size: int | None = None,
) -> list[dict]:
    """One row per recipe: its :class:`MemoryPlan` parts in GB and, per GPU, whether it fits.

    The full recipe gets two rows: on one GPU, and sharded over ``full_num_gpus`` GPUs of the same
    kind (the memory is per GPU) with ``full_batch_size`` pairs per GPU (None: ``batch_size``).
    A cell says only whether the memory fits (``"yes"`` or ``"no"``); which dtype a GPU trains
    in is :func:`gpu_table`'s, a separate question.
    """
    full_num_gpus = _positive_int("full_num_gpus", full_num_gpus)
    sharded_batch = batch_size if full_batch_size is None else full_batch_size
    _positive_int("full_batch_size", sharded_batch)
    rows = []
    for recipe, num_gpus, pairs in (
        ("qlora", 1, batch_size),
        ("lora", 1, batch_size),
        ("full", 1, batch_size),
        ("full", full_num_gpus, sharded_batch),
    ):
        plan = memory_plan(
            config,
            recipe,
            max_length=max_length,
            batch_size=pairs,
            gradient_checkpointing=gradient_checkpointing,
            lora_r=lora_r,
            num_gpus=num_gpus,
        )
        row = {
            "recipe": recipe
            if plan.num_gpus == 1
            else f"{recipe} ({plan.num_gpus} GPUs, {pairs} pairs each)",
            "trainable (M)": plan.trainable_params / 1e6,
            "weights": plan.weights,
            "reference": plan.reference,
            "gradients": plan.gradients,
            "optimizer": plan.optimizer,
            "activations": plan.activations,
            "total (GB/GPU)": plan.total,
        }
        for gpu in GPUS:
            row[gpu] = "yes" if fits(plan, gpu) else "no"
        rows.append(row)
    return rows


def gpu_table() -> list[dict]:
    """One row per GPU of :data:`GPUS`: memory, compute capability, native bf16, training dtype.

    The dtype is what :func:`focalpo_mini.recipes.compute_dtype` picks on that GPU: bf16 with
    native support, fp16 (with a loss scaler) without. Every recipe's memory plan is the same
    for both, since each is 2 bytes a value.
    """
    return [
        {
            "gpu": gpu,
            "memory (GB)": memory,
            "compute capability": f"{capability[0]}.{capability[1]}",
            "native bf16": "yes" if native_bf16(capability) else "no",
            "trains in": "bf16" if native_bf16(capability) else "fp16",
        }
        for gpu, (memory, capability) in GPUS.items()
    ]


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`fit_table`'s rows (floats to one decimal)."""
    if not rows:
        raise ValueError("rows must not be empty")
    columns = list(rows[0])
    cells = [
        [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        for row in rows
    ]
    widths = [max(len(c), *(len(line[k]) for line in cells)) for k, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def recipe_that_fits(
    config, gpu_memory_gb: float, *, max_length: int, batch_size: int, lora_r: int = 16
) -> str | None:
    """The single-GPU recipe with the most trainable parameters that fits ``gpu_memory_gb``.

    Tries ``"full"``, ``"lora"``, ``"qlora"`` in that order; None if none fits.
    """
    if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, numbers.Real):
        raise TypeError(f"gpu_memory_gb must be a number of GB, got {gpu_memory_gb!r}")
    if not math.isfinite(gpu_memory_gb) or gpu_memory_gb <= 0:
        raise ValueError(f"gpu_memory_gb must be a finite number > 0, got {gpu_memory_gb}")
    for recipe in ("full", "lora", "qlora"):
        plan = memory_plan(
            config, recipe, max_length=max_length, batch_size=batch_size, lora_r=lora_r
        )
        if plan.total <= USABLE_FRACTION * gpu_memory_gb:
            return recipe
    return None
