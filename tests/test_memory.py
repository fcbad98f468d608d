"""The memory plan's parameter counts against models transformers and peft build themselves."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GemmaConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from focalpo_mini.memory import (
    ALL_PROJECTIONS,
    GPUS,
    MISTRAL_7B_SHAPE,
    USABLE_FRACTION,
    activation_bytes,
    checkpoint_gb,
    fit_table,
    fits,
    format_table,
    gpu_table,
    layer_activation_bytes,
    linear_parameter_count,
    lora_parameter_count,
    memory_plan,
    native_bf16,
    parameter_count,
    recipe_that_fits,
)

LLAMA_3_8B = dict(**{**MISTRAL_7B_SHAPE, "vocab_size": 128256}, tie_word_embeddings=False)


def _meta_count(model_cls, config) -> tuple[int, int]:
    """(all parameters, parameters of nn.Linear layers inside decoder layers), built on meta."""
    with torch.device("meta"):
        model = model_cls(config)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(
        p.numel()
        for name, module in model.model.layers.named_modules()
        if isinstance(module, torch.nn.Linear)
        for p in module.parameters()
    )
    return total, linear


@pytest.mark.parametrize(
    ("model_cls", "config"),
    [
        (MistralForCausalLM, MistralConfig(**MISTRAL_7B_SHAPE)),
        (LlamaForCausalLM, LlamaConfig(**LLAMA_3_8B)),
        (LlamaForCausalLM, LlamaConfig(**{**LLAMA_3_8B, "tie_word_embeddings": True})),
        (LlamaForCausalLM, LlamaConfig(**MISTRAL_7B_SHAPE, attention_bias=True, mlp_bias=True)),
        (Qwen2ForCausalLM, Qwen2Config()),  # q, k and v have biases, o has none
        (Qwen2ForCausalLM, Qwen2Config(tie_word_embeddings=True, num_key_value_heads=4)),
    ],
    ids=["mistral-7b", "llama-3-8b", "llama-tied", "llama-biases", "qwen2", "qwen2-tied"],
)
def test_parameter_counts_equal_transformers(model_cls, config):
    total, linear = _meta_count(model_cls, config)
    assert parameter_count(config) == total
    assert linear_parameter_count(config) == linear


def test_the_shapes_are_the_released_models():
    """7.24B and 8.03B parameters: the sizes the Hugging Face Hub lists for Mistral-7B-v0.1 and
    Meta-Llama-3-8B."""
    assert _meta_count(MistralForCausalLM, MistralConfig(**MISTRAL_7B_SHAPE))[0] == 7_241_732_096
    assert _meta_count(LlamaForCausalLM, LlamaConfig(**LLAMA_3_8B))[0] == 8_030_261_248


def _small_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    ("r", "targets"),
    [(8, ALL_PROJECTIONS), (4, ("q_proj", "v_proj")), (2, ("down_proj", "k_proj"))],
)
def test_lora_counts_equal_peft(r, targets):
    config = _small_config()
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM"),
    )
    trainable, _ = model.get_nb_trainable_parameters()
    assert lora_parameter_count(config, r=r, target_modules=targets) == trainable


def test_lora_plan_counts_peft_trainable_parameters():
    config = _small_config()
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=16, target_modules=list(ALL_PROJECTIONS), task_type="CAUSAL_LM"),
    )
    trainable, _ = model.get_nb_trainable_parameters()
    plan = memory_plan(config, "lora", max_length=8, batch_size=1, lora_r=16)
    assert plan.trainable_params == trainable
    assert plan.optimizer == pytest.approx(trainable * 8 / 1e9)


def _saved_bytes_of_one_layer(config, *, sequences: int, length: int) -> int:
    """Bytes autograd saves in one decoder layer's forward pass of a bf16 Mistral (all weights
    trainable, SDPA attention), counted with saved_tensors_hooks: each storage once, weights
    left out."""
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    layer = model.model.layers[1]
    forward = layer.forward

    def counted_forward(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return forward(*args, **kwargs)

    layer.forward = counted_forward
    model(input_ids=torch.randint(0, config.vocab_size, (sequences, length)))
    return sum(saved.values())


@pytest.mark.parametrize(
    "shape",
    [
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
        dict(hidden_size=96, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4),
        dict(hidden_size=128, intermediate_size=352, num_attention_heads=8, num_key_value_heads=2),
    ],
    ids=["gqa", "mha", "gqa-wide-mlp"],
)
def test_layer_activations_equal_what_autograd_saves(shape, one_thread):
    """The plan's per-layer count is what torch saves, RMSNorm's fp32 copies included."""
    config = MistralConfig(
        vocab_size=128, num_hidden_layers=2, max_position_embeddings=256, **shape
    )
    config._attn_implementation = "sdpa"
    batch_size, length = 2, 24  # pairs: 4 sequences
    measured = _saved_bytes_of_one_layer(config, sequences=2 * batch_size, length=length)
    planned = layer_activation_bytes(config, max_length=length, batch_size=batch_size)
    assert planned == measured
    # The whole plan is built from that count: every layer without checkpointing, inputs plus
    # one recomputed layer with it, and one more layer's worth for the backward's transients.
    inputs = config.num_hidden_layers * config.hidden_size * 2 * batch_size * length * 2
    assert (
        activation_bytes(
            config, max_length=length, batch_size=batch_size, gradient_checkpointing=False
        )
        == (config.num_hidden_layers + 1) * measured
    )
    assert (
        activation_bytes(
            config, max_length=length, batch_size=batch_size, gradient_checkpointing=True
        )
        == inputs + 2 * measured
    )


def test_recipes_order_by_memory_and_sharding_divides_model_states():
    config = MistralConfig(**MISTRAL_7B_SHAPE)
    plans = {
        r: memory_plan(config, r, max_length=1024, batch_size=4) for r in ("qlora", "lora", "full")
    }
    assert plans["qlora"].total < plans["lora"].total < plans["full"].total
    # Both adapters are fp32 (build_trainer casts QLoRA's back from TRL's bf16), as are their
    # gradients and AdamW moments.
    adapter = plans["lora"].trainable_params
    assert plans["qlora"].gradients == plans["lora"].gradients == pytest.approx(adapter * 4 / 1e9)
    assert plans["qlora"].optimizer == plans["lora"].optimizer
    # 4-bit base: under a third of the bf16 base.
    assert plans["qlora"].weights < plans["lora"].weights / 3
    sharded = memory_plan(config, "full", max_length=1024, batch_size=4, num_gpus=8)
    states = plans["full"].total - plans["full"].activations
    assert sharded.total - sharded.activations == pytest.approx(states / 8)
    # Full fine-tuning: 16 bytes per parameter; a live fp32 reference adds 4 more. Under ZeRO-3
    # the weights and gradients are bf16, and the fp32 master copy sits in the optimiser.
    assert states == pytest.approx(parameter_count(config) * 16 / 1e9)
    assert sharded.weights == sharded.gradients == pytest.approx(plans["full"].weights / 16)
    assert sharded.optimizer == pytest.approx(parameter_count(config) * 12 / 8 / 1e9)
    live_ref = memory_plan(
        config, "full", max_length=1024, batch_size=4, precompute_ref_log_probs=False
    )
    assert live_ref.reference == pytest.approx(parameter_count(config) * 4 / 1e9)


def test_fit_table_says_only_whether_memory_fits():
    config = MistralConfig(**MISTRAL_7B_SHAPE)
    rows = fit_table(config, max_length=1024, batch_size=4, full_batch_size=2)
    assert [row["recipe"] for row in rows] == [
        "qlora",
        "lora",
        "full",
        "full (8 GPUs, 2 pairs each)",
    ]
    sharded = memory_plan(config, "full", max_length=1024, batch_size=2, num_gpus=8)
    assert rows[3]["total (GB/GPU)"] == sharded.total
    for row in rows:
        for gpu, (memory, _) in GPUS.items():
            fit = row["total (GB/GPU)"] <= USABLE_FRACTION * memory
            assert row[gpu] == ("yes" if fit else "no")
    assert rows[2]["H100 80GB"] == "no"  # full 7B on one GPU: over 100 GB
    assert "recipe" in format_table(rows).splitlines()[0]


def test_recipe_that_fits_picks_the_largest_recipe():
    config = MistralConfig(**MISTRAL_7B_SHAPE)
    kwargs = dict(max_length=1024, batch_size=4)
    for memory in (16, 24, 40, 80, 1000):
        choice = recipe_that_fits(config, memory, **kwargs)
        assert choice is not None
        plan = memory_plan(config, choice, **kwargs)
        assert plan.total <= USABLE_FRACTION * memory
    assert recipe_that_fits(config, 1000, **kwargs) == "full"
    assert recipe_that_fits(config, 1, **kwargs) is None


def test_invalid_arguments_are_rejected():
    config = _small_config()
    with pytest.raises(ValueError, match="recipe"):
        memory_plan(config, "adapter", max_length=8, batch_size=1)
    with pytest.raises(ValueError, match="num_gpus"):
        memory_plan(config, "lora", max_length=8, batch_size=1, num_gpus=2)
    with pytest.raises(ValueError, match="max_length"):
        memory_plan(config, "lora", max_length=0, batch_size=1)
    with pytest.raises(ValueError, match="target_modules"):
        lora_parameter_count(config, r=4, target_modules=("wq",))
    with pytest.raises(ValueError, match="r must"):
        lora_parameter_count(config, r=0)
    with pytest.raises(TypeError, match="config"):
        parameter_count(object())
    with pytest.raises(ValueError, match="gpu"):
        fits(memory_plan(config, "lora", max_length=8, batch_size=1), "V100")
    with pytest.raises(TypeError, match="plan must be a MemoryPlan"):
        fits("plan", "T4 16GB")
    # Each error names the argument the caller passed, not an inner function's.
    with pytest.raises(ValueError, match="lora_r"):
        fit_table(config, max_length=8, batch_size=1, lora_r=0)
    with pytest.raises(ValueError, match="full_num_gpus"):
        fit_table(config, max_length=8, batch_size=1, full_num_gpus=0)
    with pytest.raises(TypeError, match="r must"):
        lora_parameter_count(config, r=True)
    with pytest.raises(TypeError, match="target_modules"):
        lora_parameter_count(config, r=4, target_modules="q_proj")
    for flag in ("no", "False"):
        with pytest.raises(TypeError, match="precompute_ref_log_probs"):
            memory_plan(config, "full", max_length=8, batch_size=1, precompute_ref_log_probs=flag)
        with pytest.raises(TypeError, match="gradient_checkpointing"):
            activation_bytes(config, max_length=8, batch_size=1, gradient_checkpointing=flag)


def test_a_module_named_twice_is_adapted_once():
    config = _small_config()
    once = lora_parameter_count(config, r=4, target_modules=("q_proj",))
    assert lora_parameter_count(config, r=4, target_modules=("q_proj", "q_proj")) == once
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, target_modules=["q_proj", "q_proj"], task_type="CAUSAL_LM"),
    )
    assert model.get_nb_trainable_parameters()[0] == once


def test_checkpoint_sizes_per_recipe():
    config = MistralConfig(**MISTRAL_7B_SHAPE)
    n = parameter_count(config)
    adapter = lora_parameter_count(config, r=16)
    assert checkpoint_gb(config, "qlora") == checkpoint_gb(config, "lora")
    assert checkpoint_gb(config, "lora") == pytest.approx(adapter * 12 / 1e9)
    assert checkpoint_gb(config, "full") == pytest.approx(n * 12 / 1e9)
    # ZeRO-3: the 16-bit model and fp32 master weights and moments, about 101 GB for 7B.
    zero3 = checkpoint_gb(config, "full", num_gpus=8)
    assert zero3 == pytest.approx(n * 14 / 1e9)
    assert 100 < zero3 < 102
    assert checkpoint_gb(config, "full", num_gpus=8, save_only_model=True) == pytest.approx(
        n * 2 / 1e9
    )


def test_gpu_table_keeps_dtype_apart_from_memory():
    rows = {row["gpu"]: row for row in gpu_table()}
    assert rows["T4 16GB"]["native bf16"] == "no" and rows["T4 16GB"]["trains in"] == "fp16"
    for gpu in ("L4 24GB", "A100 40GB", "A100 80GB", "H100 80GB"):
        assert rows[gpu]["native bf16"] == "yes" and rows[gpu]["trains in"] == "bf16"
    assert rows["T4 16GB"]["compute capability"] == "7.5"
    assert native_bf16((8, 0)) and not native_bf16((7, 5))
    with pytest.raises(TypeError, match="capability"):
        native_bf16("8.0")


def test_mixture_of_experts_is_refused_not_undercounted():
    """Mixtral-8x7B has 46.7B parameters; a dense count would give 7.24B."""
    with torch.device("meta"):
        total = sum(p.numel() for p in MixtralForCausalLM(MixtralConfig()).parameters())
    assert total > 46e9
    with pytest.raises(ValueError, match="mixture-of-experts"):
        parameter_count(MixtralConfig())
    with pytest.raises(ValueError, match="mixture-of-experts"):
        memory_plan(MixtralConfig(), "qlora", max_length=8, batch_size=1)


def _edited(config, **fields):
    """The config with fields set after construction (LlamaConfig itself divides by the heads)."""
    for name, value in fields.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda c: memory_plan(c, "lora", max_length=None, batch_size=1), TypeError, "max_length"),
        (lambda c: memory_plan(c, "lora", max_length=8, batch_size=0), ValueError, "batch_size"),
        (lambda c: memory_plan(c, "lora", max_length=8.0, batch_size=1), TypeError, "max_length"),
        (
            lambda c: parameter_count(_edited(c, num_attention_heads=0)),
            ValueError,
            "num_attention_heads",
        ),
        (
            lambda c: parameter_count(_edited(c, num_hidden_layers=-1)),
            ValueError,
            "num_hidden_layers",
        ),
        (
            lambda c: recipe_that_fits(c, "80", max_length=8, batch_size=1),
            TypeError,
            "gpu_memory_gb",
        ),
        (
            lambda c: recipe_that_fits(c, float("nan"), max_length=8, batch_size=1),
            ValueError,
            "gpu_memory_gb",
        ),
        (
            lambda c: memory_plan(c, "lora", max_length=8, batch_size=1, gradient_checkpointing=1),
            TypeError,
            "gradient_checkpointing",
        ),
        (lambda c: parameter_count(GemmaConfig()), ValueError, "model_type"),
    ],
    ids=[
        "max_length-None",
        "batch_size-0",
        "max_length-float",
        "heads-0",
        "layers-negative",
        "gpu-memory-str",
        "gpu-memory-nan",
        "checkpointing-int",
        "other-architecture",
    ],
)
def test_bad_arguments_name_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call(_small_config())
