"""The 7B chapter's non-smoke code path on a CPU, for every recipe: a reduced MistralForCausalLM
and a tokenizer with a Zephyr-style chat template saved to a local folder, and a local dataset
in the schema of ``trl-lib/ultrafeedback_binarized``, through ``load_model_and_tokenizer ->
load_preference_data -> build_trainer -> train -> save`` with ``smoke=False``.

What this does not reach: CUDA, the bf16/fp16 mixed-precision branch, paged AdamW and TRL's
Triton kernels (all GPU-only). QLoRA runs bitsandbytes' CPU 4-bit kernels.
"""

import math
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from focalpo_mini.recipes import (
    RunSettings,
    build_trainer,
    generate_samples,
    load_model_and_tokenizer,
    load_preference_data,
    sample_prompts,
    smoke_preference_data,
    train,
)

ROOT = Path(__file__).resolve().parents[1]

# Zephyr's chat format (HuggingFaceH4/mistral-7b-sft-beta): a role tag on its own line, the
# message, then the end-of-sequence token; the generation prompt opens the assistant's turn.
ZEPHYR_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def hub_stand_in(tmp_path_factory):
    """(model folder, dataset folder): what ``from_pretrained`` and ``load_dataset`` read."""
    from focalpo_mini.tiny import make_tokenizer

    root = tmp_path_factory.mktemp("hub")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = ZEPHYR_STYLE_TEMPLATE
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        MistralForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "data").mkdir()
    smoke_preference_data(16, seed=0).to_json(root / "data" / "train.jsonl")
    smoke_preference_data(4, seed=1).to_json(root / "data" / "test.jsonl")
    return root / "model", root / "data"


@pytest.mark.parametrize("recipe", ["lora", "full", "qlora"])
def test_non_smoke_path_trains_and_saves(recipe, hub_stand_in, tmp_path, one_thread):
    if recipe == "qlora":
        pytest.importorskip("bitsandbytes")
    model_dir, data_dir = hub_stand_in
    settings = RunSettings(
        model_id=str(model_dir),
        dataset_id=str(data_dir),
        recipe=recipe,
        smoke=False,
        max_length=64,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=2,
        num_pairs=8,
        max_new_tokens=3,
        save_steps=2,
        output_dir=str(tmp_path / "out"),
    ).resolved()
    model, tokenizer = load_model_and_tokenizer(settings)
    assert type(model).__name__ == "MistralForCausalLM"
    if recipe == "qlora":
        import bitsandbytes as bnb

        q_proj = model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == f"<|user|>\nhi{tokenizer.eos_token}\n"
    data = load_preference_data(settings)
    assert len(data) == 8 and data.column_names[:2] == ["chosen", "rejected"]
    if recipe != "qlora":  # bitsandbytes' CPU 4-bit repacks its weights for inference in eval()
        prompts = sample_prompts(load_preference_data(settings, "test"), 1)
        assert len(generate_samples(model, tokenizer, prompts, settings.max_new_tokens)) == 1

    trainer = build_trainer(settings, model, tokenizer, data)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert trainer.args.learning_rate == (5e-7 if recipe == "full" else 5e-6)
    assert trainer.args.precompute_ref_log_probs == (recipe == "full")
    assert trainer.args.ddp_find_unused_parameters is False
    train(trainer)
    assert trainer.state.global_step == 2
    first = next(e for e in trainer.state.log_history if "loss" in e)
    # Policy == reference at step 1: the adapter starts at zero, and the full recipe's
    # precomputed reference is the untrained policy.
    assert first["loss"] == pytest.approx(0.5**0.5 * math.log(2), rel=1e-4)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    trainer.save_model(settings.output_dir)
    saved = "model.safetensors" if recipe == "full" else "adapter_model.safetensors"
    assert (tmp_path / "out" / saved).is_file()


def test_alpaca_eval_config_uses_the_models_chat_format():
    """The AlpacaEval prompt is what the Zephyr-style chat template makes of an empty system turn
    and one user turn (the form of alpaca_eval's own Zephyr prompt), with Mistral's
    end-of-sequence token; the generation settings are spelled out, under the names vLLM's
    engine (``dtype``) and ``SamplingParams`` (no ``do_sample``) take."""
    import jinja2
    import yaml

    folder = ROOT / "configs" / "alpaca_eval" / "focalpo-mistral-7b"
    (name, config), *others = yaml.safe_load((folder / "configs.yaml").read_text()).items()
    assert not others and name == folder.name
    assert config["prompt_template"] == f"{folder.name}/prompt.txt"  # relative to models_configs
    rendered = jinja2.Template(ZEPHYR_STYLE_TEMPLATE).render(
        messages=[{"role": "system", "content": ""}, {"role": "user", "content": "{instruction}"}],
        eos_token="</s>",
        add_generation_prompt=True,
    )
    assert (folder / "prompt.txt").read_text() == rendered
    kwargs = config["completions_kwargs"]
    assert config["fn_completions"] == "vllm_local_completions"
    assert set(kwargs) == {"model_name", "model_kwargs", "max_new_tokens", "temperature", "top_p"}
    assert kwargs["model_kwargs"] == {"dtype": "bfloat16"}


def test_arena_hard_settings_are_v0_1_with_the_gpt4_turbo_judge():
    import yaml

    folder = ROOT / "configs" / "arena_hard"
    answers = yaml.safe_load((folder / "gen_answer_config.yaml").read_text())
    endpoints = yaml.safe_load((folder / "api_config.yaml").read_text())
    assert answers["bench_name"] == "arena-hard-v0.1"
    assert set(answers["model_list"]) <= set(endpoints)
    assert "gpt-4-1106-preview" in endpoints
    # gen_answer.py passes the endpoint entry itself to the completion function.
    for name, entry in endpoints.items():
        assert entry["model"] == name and "model_name" not in entry
        assert {"api_type", "temperature", "max_tokens", "parallel"} <= set(entry)
    text = (folder / "gen_answer_config.yaml").read_text()
    assert "--config-file" in text and "--setting-file <book>" not in text
    assert "--category arena-hard-v0.1" in text
