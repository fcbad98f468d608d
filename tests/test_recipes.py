"""The shared run recipe in smoke mode: UltraFeedback's schema, LoRA with the adapter-off
reference, and the settings each recipe resolves to."""

import dataclasses
import math
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from peft import PeftModel
from transformers import MistralConfig, TrainerCallback

from focalpo_mini import recipes
from focalpo_mini.data import true_reward
from focalpo_mini.memory import MISTRAL_7B_SHAPE, parameter_count
from focalpo_mini.recipes import (
    SMOKE_OVERRIDES,
    ProgressReport,
    RunSettings,
    build_trainer,
    compute_dtype,
    describe_hardware,
    device_arguments,
    estimated_step_seconds,
    generate_samples,
    load_model_and_tokenizer,
    load_preference_data,
    lora_config,
    sample_prompts,
    smoke_preference_data,
    steps_for_budget,
    train,
    training_config,
)

ROOT = Path(__file__).resolve().parents[1]


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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of the user's is replaced: no warning
        smoke = RunSettings(smoke=True, gamma=0.3).resolved()
    assert smoke.gamma == 0.3
    assert all(getattr(smoke, k) == v for k, v in SMOKE_OVERRIDES.items())
    with pytest.raises(ValueError, match="recipe"):
        RunSettings(recipe="dora")
    with pytest.raises(ValueError, match="beta"):
        RunSettings(beta=0)


def test_resolving_is_a_function_of_the_users_settings():
    """An edited resolved copy is resolved again from the user's settings, never from an
    earlier resolution: the LoRA default learning rate does not follow a switch to full."""
    lora = RunSettings().resolved()
    assert lora.replace(recipe="full").learning_rate == 5e-7
    assert lora.replace(recipe="full") == RunSettings(recipe="full").resolved()
    assert lora.replace(smoke=True).max_length == SMOKE_OVERRIDES["max_length"]
    chosen = RunSettings(learning_rate=1e-5).resolved()
    assert chosen.replace(recipe="full").learning_rate == 1e-5  # the user's own value stays
    with pytest.raises(TypeError, match="max_steps"):
        dataclasses.replace(lora, max_steps=2)  # only .replace, which resolves again


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
    # No warm-up in smoke mode, so step 1 already moves the adapter (a warm-up from a learning
    # rate of 0 would leave step 2's margins at 0 too).
    second = [e for e in trainer.state.log_history if "loss" in e][1]
    assert abs(second["rewards/margins"]) > 1e-6
    after = generate_samples(trainer.model, tokenizer, prompts, max_new_tokens=4)
    assert len(before) == len(after) == 2
    trainer.save_model(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()


# What torch reports on a T4 (sm_75) and an A100 (sm_80). is_bf16_supported() says True on both,
# as it does on a real T4 (it counts emulation by default): the choice must not rest on it.
GPUS = {"T4": ((7, 5), "Tesla T4"), "A100": ((8, 0), "NVIDIA A100-SXM4-40GB")}


def _simulated_gpu(name):
    capability, device_name = GPUS[name]
    props = mock.Mock(total_memory=16e9 if name == "T4" else 40e9)
    props.name = device_name
    return [
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.get_device_capability", return_value=capability),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
        mock.patch("torch.cuda.get_device_name", return_value=device_name),
        mock.patch("torch.cuda.get_device_properties", return_value=props),
    ]


@pytest.mark.parametrize(("gpu", "expected"), [("T4", torch.float16), ("A100", torch.bfloat16)])
def test_dtype_on_a_simulated_gpu(gpu, expected, monkeypatch):
    patches = _simulated_gpu(gpu)
    for patch in patches:
        patch.start()
    try:
        assert compute_dtype() == expected
        args = device_arguments("qlora")
        assert (args["bf16"], args["fp16"], args["use_cpu"]) == (
            expected == torch.bfloat16,
            expected == torch.float16,
            False,
        )
        assert args["optim"] == "paged_adamw_32bit"
        assert device_arguments("lora")["optim"] == "adamw_torch_fused"
        line = describe_hardware()
        assert GPUS[gpu][1] in line and str(expected) in line
        assert ("no native bf16" in line) == (gpu == "T4")
        # The model is loaded for that dtype: a 4-bit base computing in it, a LoRA base stored
        # in it, and fp32 weights for full fine-tuning.
        loaded = {}

        def fake_from_pretrained(model_id, **kwargs):
            loaded.update(kwargs)
            raise RuntimeError("stop before loading")

        monkeypatch.setattr(
            "transformers.AutoModelForCausalLM.from_pretrained", fake_from_pretrained
        )
        monkeypatch.setattr(recipes, "process_state", lambda: mock.Mock(local_process_index=0))
        for recipe, dtype in (("qlora", expected), ("lora", expected), ("full", torch.float32)):
            with pytest.raises(RuntimeError, match="stop before loading"):
                load_model_and_tokenizer(RunSettings(recipe=recipe))
            assert loaded["dtype"] == dtype
        with pytest.raises(RuntimeError, match="stop before loading"):
            load_model_and_tokenizer(RunSettings(recipe="qlora"))
        assert loaded["quantization_config"].bnb_4bit_compute_dtype == expected
    finally:
        for patch in patches:
            patch.stop()
    # The same function answers for a GPU that is not here.
    assert compute_dtype(GPUS[gpu][0]) == expected


def test_zero3_says_the_parameters_are_bf16_with_an_fp32_master(monkeypatch):
    """Under DeepSpeed ZeRO-3 the fp32 cast of build_trainer does not last: the hardware line
    says what is true there."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    patches = _simulated_gpu("A100")
    for patch in patches:
        patch.start()
    try:
        line = describe_hardware()
    finally:
        for patch in patches:
            patch.stop()
    assert "bf16 with an fp32 master copy" in line and "trainable parameters in" not in line


def test_dtype_without_a_gpu():
    with mock.patch("torch.cuda.is_available", return_value=False):
        assert compute_dtype() == torch.float32
        assert device_arguments("full") == {
            "bf16": False,
            "fp16": False,
            "use_cpu": True,
            "optim": "adamw_torch",
        }


def test_cast_trainable_to_fp32_casts_only_trainable_parameters(small_model):
    """What build_trainer does after TRL cast a 4-bit model's adapter to bf16 (the QLoRA case
    itself runs in tests/test_gpu_path_on_cpu.py)."""
    from peft import get_peft_model

    settings = RunSettings(smoke=True)
    model = get_peft_model(small_model().to(torch.bfloat16), lora_config(settings))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    trainable = sum(p.requires_grad for p in model.parameters())
    assert recipes.cast_trainable_to_fp32(model) == trainable
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"gradient_accumulation_steps": 0}, ValueError, "gradient_accumulation_steps"),
        ({"gradient_accumulation_steps": 2.0}, TypeError, "gradient_accumulation_steps"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"beta": float("inf")}, ValueError, "beta"),
        ({"gamma": "0.5"}, TypeError, "gamma"),
        ({"gamma": float("nan")}, ValueError, "gamma"),
        ({"max_length": "1024"}, TypeError, "max_length"),
        ({"max_length": 0}, ValueError, "max_length"),
        ({"smoke": "yes"}, TypeError, "smoke"),
        ({"smoke": 1}, TypeError, "smoke"),
        ({"learning_rate": "5e-6"}, TypeError, "learning_rate"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"max_steps": 0}, ValueError, "max_steps"),
        ({"num_pairs": 0}, ValueError, "num_pairs"),
        ({"num_pairs": 8.5}, TypeError, "num_pairs"),
        ({"save_steps": 0}, ValueError, "save_steps"),
        ({"save_total_limit": 0}, ValueError, "save_total_limit"),
        ({"learning_rate": 1e39}, ValueError, "learning_rate"),
        ({"warmup_ratio": 1.5}, ValueError, "warmup_ratio"),
        ({"output_dir": None}, TypeError, "output_dir"),
        ({"recipe": "dora"}, ValueError, "recipe"),
    ],
)
def test_settings_refuse_bad_values_naming_the_field(kwargs, error, name):
    with pytest.raises(error, match=name):
        RunSettings(**kwargs)


def test_smoke_mode_says_which_of_your_settings_it_replaces():
    with pytest.warns(UserWarning, match="smoke mode replaces") as caught:
        settings = RunSettings(smoke=True, max_steps=500, num_pairs=2000, learning_rate=1e-5)
        settings = settings.resolved()
    message = str(caught[0].message)
    for name in ("max_steps 500 -> 4", "num_pairs 2000 -> 32", "learning_rate 1e-05 -> 0.001"):
        assert name in message
    assert "gamma" not in message
    assert settings.max_steps == SMOKE_OVERRIDES["max_steps"]


def test_numpy_numbers_are_accepted():
    import numpy as np

    config = training_config(RunSettings(smoke=True, gamma=np.float32(0.25), beta=np.float64(0.1)))
    assert config.gamma == 0.25 and type(config.gamma) is float
    assert config.beta == pytest.approx(0.1)


def test_functions_refuse_what_is_not_settings():
    with pytest.raises(TypeError, match="settings must be a RunSettings"):
        training_config({"recipe": "qlora"})
    with pytest.raises(TypeError, match="settings must be a RunSettings"):
        load_preference_data({"smoke": True})
    with pytest.raises(TypeError, match="settings must be a RunSettings"):
        lora_config(None)
    with pytest.raises(ValueError, match="recipe"):
        device_arguments("dora")


@pytest.mark.parametrize(
    ("env", "recipe", "message"),
    [
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "lora",
            "ZeRO-3",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "qlora",
            "ZeRO-3",
        ),
        # accelerate reads "1" as true too: QLoRA must not get through under ZeRO-3 that way.
        (
            {"ACCELERATE_USE_DEEPSPEED": "1", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "qlora",
            "ZeRO-3",
        ),
        ({"ACCELERATE_USE_FSDP": "true"}, "qlora", "FSDP"),
        ({"ACCELERATE_USE_FSDP": "yes"}, "lora", "FSDP"),
        ({"ACCELERATE_USE_FSDP": "true"}, "full", "precomputes the reference"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "three"},
            "full",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "maybe"}, "full", "ACCELERATE_USE_DEEPSPEED"),
    ],
)
def test_unsupported_launches_are_refused_before_loading(
    env, recipe, message, monkeypatch, tmp_path
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = RunSettings(recipe=recipe, smoke=True, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        load_model_and_tokenizer(settings)
    with pytest.raises(ValueError, match=message):
        build_trainer(settings, None, None, None)


def test_zero3_config_exists_before_from_pretrained(monkeypatch):
    """transformers partitions weights at load time only if a ZeRO-3 TrainingArguments is alive
    during from_pretrained: the order of the calls, and the liveness, are what matter."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    calls = []
    alive = []

    class Args:
        pass

    def fake_training_config(settings):
        calls.append("training_config")
        args = Args()
        alive.append(__import__("weakref").ref(args))
        return args

    def fake_from_pretrained(model_id, **kwargs):
        calls.append("from_pretrained")
        assert alive and alive[-1]() is not None, "the ZeRO-3 arguments were already freed"
        raise RuntimeError("stop")

    monkeypatch.setattr(recipes, "training_config", fake_training_config)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fake_from_pretrained)
    with pytest.raises(RuntimeError, match="stop"):
        load_model_and_tokenizer(RunSettings(recipe="full"))
    assert calls == ["training_config", "from_pretrained"]


class _InterruptAfterSave(TrainerCallback):
    """Ctrl-C right after the checkpoint of ``step`` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class _FirstStep(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _smoke_trainer(output_dir):
    settings = RunSettings(smoke=True, output_dir=str(output_dir)).resolved()
    model, tokenizer = load_model_and_tokenizer(settings)
    return build_trainer(settings, model, tokenizer, load_preference_data(settings))


def test_a_run_interrupted_after_step_2_resumes_at_step_2(tmp_path, one_thread, capsys):
    assert SMOKE_OVERRIDES["save_steps"] == 2 and SMOKE_OVERRIDES["max_steps"] == 4
    reference = _smoke_trainer(tmp_path / "uninterrupted")
    train(reference)

    first = _smoke_trainer(tmp_path / "run")
    first.add_callback(_InterruptAfterSave(2))
    with pytest.raises(KeyboardInterrupt):
        train(first)
    assert first.state.global_step == 2
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    assert "no complete checkpoint: starting at step 0" in capsys.readouterr().out

    again = _smoke_trainer(tmp_path / "run")  # a re-run of the notebook: everything rebuilt
    steps = _FirstStep()
    again.add_callback(steps)
    train(again)
    assert "resuming from" in capsys.readouterr().out
    assert steps.steps == [2, 3]  # optimiser steps 3 and 4 only
    assert again.state.global_step == 4
    # The resumed run ends where the uninterrupted one does.
    logged = [e["loss"] for e in again.state.log_history if "loss" in e]
    expected = [e["loss"] for e in reference.state.log_history if "loss" in e]
    assert logged == pytest.approx(expected, rel=1e-5)
    for (name, a), (_, b) in zip(
        again.model.named_parameters(), reference.model.named_parameters(), strict=True
    ):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    # A save_total_limit of 2 keeps the last two checkpoints.
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


def test_progress_report_prints_seconds_per_step_and_time_left(tmp_path, one_thread):
    printed = []
    trainer = _smoke_trainer(tmp_path)
    report = ProgressReport(after=2, print_fn=printed.append)
    trainer.add_callback(report)
    train(trainer)
    # Step 1 is not timed; steps 2-3 are, then the checkpoint at step 4 reports again.
    assert len(printed) == 3
    assert printed[0].startswith("step 3/4: ") and "measured over 2 steps" in printed[0]
    assert printed[1].startswith("step 4/4: ") and "0.00 h left" in printed[1]
    assert printed[2] == "the run is complete: step 4/4"
    assert report.seconds_per_step > 0


def test_peak_tflops_matches_exact_device_names():
    assert recipes.peak_tflops("NVIDIA L40S") == 362.0
    assert recipes.peak_tflops("NVIDIA L4") == 121.0
    assert recipes.peak_tflops("Tesla T4") == 65.0
    assert recipes.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    # Each H100 form factor has its own peak; names that only share a prefix are unknown.
    assert recipes.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert recipes.peak_tflops("NVIDIA H100 PCIe") < recipes.peak_tflops("NVIDIA H100 NVL") < 989
    for other in ("NVIDIA L40", "NVIDIA RTX A1000", "NVIDIA T400", "Quadro RTX 6000", "H100"):
        assert recipes.peak_tflops(other) is None, other
    with pytest.raises(TypeError, match="gpu_name"):
        recipes.peak_tflops(None)
    # Every GPU of the memory plan's table has a peak under the name torch reports for it.
    from focalpo_mini.memory import GPUS

    assert sorted(recipes.DEVICE_NAMES) == sorted(GPUS)
    assert all(recipes.peak_tflops(name) for name in recipes.DEVICE_NAMES.values())


def test_step_time_estimate_counts_six_n_per_token():
    """MFU as PaLM defines it: 6N model FLOPs per token, recomputation not counted; the same
    function serves the estimate and benchmarks/gpu_7b_step.py."""
    config = MistralConfig(**MISTRAL_7B_SHAPE)
    settings = RunSettings()
    n = parameter_count(config) - MISTRAL_7B_SHAPE["vocab_size"] * MISTRAL_7B_SHAPE["hidden_size"]
    assert recipes.model_flops_per_token(config) == 6 * n
    tokens = 2 * 16 * 1024
    seconds = estimated_step_seconds(config, settings, 100.0, mfu=0.5)
    assert seconds == pytest.approx(6 * n * tokens / (100e12 * 0.5))
    assert steps_for_budget(1.0, seconds) == math.floor(3600 / seconds)
    with pytest.raises(ValueError, match="mfu"):
        estimated_step_seconds(config, settings, 100.0, mfu=0)
    for hours in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="hours"):
            steps_for_budget(hours, 1.0)
    with pytest.raises(ValueError, match="step_seconds"):
        steps_for_budget(1.0, float("inf"))


def test_sessions_left():
    assert recipes.sessions_left(0, 10.0, 1.0) == 0
    assert recipes.sessions_left(360, 10.0, 1.0) == 1
    assert recipes.sessions_left(361, 10.0, 1.0) == 2
    with pytest.raises(ValueError, match="budget_hours"):
        recipes.sessions_left(10, 1.0, float("inf"))
