"""The shared run recipe in smoke mode: UltraFeedback's schema, LoRA with the adapter-off
reference, and the settings each recipe resolves to."""

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from peft import PeftModel

from focalpo_mini.data import true_reward
from focalpo_mini.recipes import (
    SMOKE_OVERRIDES,
    RunSettings,
    build_trainer,
    generate_samples,
    load_model_and_tokenizer,
    load_preference_data,
    lora_config,
    sample_prompts,
    smoke_preference_data,
    training_config,
)


def test_smoke_data_has_ultrafeedbacks_schema():
    data = smoke_preference_data(8, seed=0)
    assert data.column_names == ["chosen", "rejected", "score_chosen", "score_rejected"]
    for row in data:
        assert [m["role"] for m in row["chosen"]] == ["user", "assistant"]
        assert row["chosen"][0] == row["rejected"][0]  # same prompt, no prompt column
        prompt = row["chosen"][0]["content"]
        for side in ("chosen", "rejected"):
            reward = true_reward(prompt, row[side][1]["content"])
            assert row[f"score_{side}"] == pytest.approx(1 + 9 * reward)
        assert row["score_chosen"] > row["score_rejected"]


def test_resolved_settings():
    assert RunSettings().resolved().learning_rate == 5e-6
    assert RunSettings(recipe="full").resolved().learning_rate == 5e-7
    assert RunSettings(learning_rate=1e-5).resolved().learning_rate == 1e-5
    smoke = RunSettings(smoke=True, gamma=0.3).resolved()
    assert smoke.gamma == 0.3
    assert all(getattr(smoke, k) == v for k, v in SMOKE_OVERRIDES.items())
    edited = dataclasses.replace(smoke, max_steps=2)
    assert edited.resolved().max_steps == 2  # resolving again keeps the edit
    with pytest.raises(ValueError, match="recipe"):
        RunSettings(recipe="dora")
    with pytest.raises(ValueError, match="beta"):
        RunSettings(beta=0)


def test_configs_per_recipe():
    assert lora_config(RunSettings(recipe="full")) is None
    assert sorted(lora_config(RunSettings()).target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    full = training_config(RunSettings(recipe="full", smoke=True))
    assert full.precompute_ref_log_probs and full.gradient_checkpointing
    lora = training_config(RunSettings(smoke=True, gamma=0.7))
    assert not lora.precompute_ref_log_probs
    assert lora.gamma == 0.7 and lora.beta == 0.01


def test_smoke_run_uses_lora_with_the_adapter_off_reference(tmp_path):
    settings = RunSettings(smoke=True, gamma=0.5, output_dir=str(tmp_path)).resolved()
    settings = dataclasses.replace(settings, max_steps=2)
    model, tokenizer = load_model_and_tokenizer(settings)
    data = load_preference_data(settings)
    prompts = sample_prompts(load_preference_data(settings, "test"), 2)
    before = generate_samples(model, tokenizer, prompts, max_new_tokens=4)
    trainer = build_trainer(settings, model, tokenizer, data)
    assert isinstance(trainer.model, PeftModel) and trainer.ref_model is None
    trainer.train()
    first = next(e for e in trainer.state.log_history if "loss" in e)
    # Step 1: the adapter's B matrices are zero, so policy == reference, z = 0, p = 1/2 and the
    # FocalPO loss is (1/2)**gamma * ln 2.
    assert first["loss"] == pytest.approx(0.5**0.5 * math.log(2), rel=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    after = generate_samples(trainer.model, tokenizer, prompts, max_new_tokens=4)
    assert len(before) == len(after) == 2
    trainer.save_model(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_7b_chapter_installs_the_pinned_versions():
    """The Colab cell of the 7B chapter pins trl and peft as requirements.txt does."""
    root = Path(__file__).resolve().parents[1]
    pins = dict(
        line.split("==")
        for line in (root / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    cells = json.loads((root / "book/part3/09_full_7b_run.ipynb").read_text())["cells"]
    setup = "".join(cells[0]["source"])
    installed = dict(re.findall(r'"([\w-]+)==([\w.]+)"', setup))
    assert installed["trl"] == pins["trl"]
    assert installed["peft"] == pins["peft"]
    assert "bitsandbytes" in installed
    assert not re.search(r"install[^\n]*\btorch\b", setup), "the setup cell must not install torch"


def test_hub_path_with_a_local_model_and_dataset(tmp_path, tokenizer):
    """The non-smoke path (what a GPU run does, minus 4-bit), fed a local model and local files."""
    from focalpo_mini.tiny import make_model

    model_dir = tmp_path / "model"
    make_model(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    smoke_preference_data(16, seed=0).to_json(data_dir / "train.jsonl")
    smoke_preference_data(4, seed=1).to_json(data_dir / "test.jsonl")
    settings = RunSettings(
        model_id=str(model_dir),
        dataset_id=str(data_dir),
        recipe="lora",
        max_length=64,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=1,
        num_pairs=8,
        max_new_tokens=3,
        output_dir=str(tmp_path / "out"),
    ).resolved()
    model, loaded_tokenizer = load_model_and_tokenizer(settings)
    data = load_preference_data(settings)
    assert len(data) == 8 and data.column_names[:2] == ["chosen", "rejected"]
    prompts = sample_prompts(load_preference_data(settings, "test"), 1)
    assert len(generate_samples(model, loaded_tokenizer, prompts, settings.max_new_tokens)) == 1
    trainer = build_trainer(settings, model, loaded_tokenizer, data)
    assert trainer.args.learning_rate == 5e-6 and trainer.args.beta == 0.01
    trainer.train()
    first = next(e for e in trainer.state.log_history if "loss" in e)
    assert first["loss"] == pytest.approx(0.5**0.5 * math.log(2), rel=1e-5)
