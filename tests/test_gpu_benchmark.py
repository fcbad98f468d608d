"""benchmarks/gpu_7b_step.py without CUDA: the tiny-shape dry run of the same code, and what it
does when a recipe runs out of memory or crashes."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--warmup", "1"]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_7b_step", ROOT / "benchmarks/gpu_7b_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the no-CUDA path")
def test_dry_run_trains_each_recipe_and_writes_json(tmp_path, one_thread):
    pytest.importorskip("bitsandbytes")
    bench = _load_benchmark()
    output = tmp_path / "result.json"
    report = bench.main([*FAST, "--output", str(output), "--scratch-dir", str(tmp_path)])
    assert json.loads(output.read_text()) == report
    assert report["dry_run"] and report["gpu"] == "cpu"
    assert report["skipped"] == []
    assert [r["recipe"] for r in report["results"]] == ["qlora", "lora", "full"]

    with torch.device("meta"):
        n = sum(p.numel() for p in MistralForCausalLM(MistralConfig(**bench.TINY)).parameters())
    n -= bench.TINY["vocab_size"] * bench.TINY["hidden_size"]  # embedding: no matmul
    tokens = 2 * report["batch_size"] * report["max_length"]
    for row in report["results"]:
        assert row["steps_timed"] == 2
        assert row["step_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(tokens / row["step_s"])
        assert row["model_tflops_per_step"] == pytest.approx(6 * n * tokens / 1e12)
        assert row["mfu"] is None and row["peak_memory_gb"] is None
        assert row["peak_reserved_gb"] is None
        assert row["optim"] == "adamw_torch"  # on a GPU: fused AdamW, or paged for QLoRA
        assert row["planned_memory_gb"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the no-CUDA path")
def test_an_out_of_memory_recipe_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    bench = _load_benchmark()
    ran = []

    def fake_run(recipe, args, shape):
        ran.append(recipe)
        if recipe == "lora":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"recipe": recipe, "step_s": 1.0, "tokens_per_s": 1.0, "mfu": None}

    monkeypatch.setattr(bench, "run_recipe", fake_run)
    monkeypatch.setattr(bench, "_print_row", lambda row: None)
    output = tmp_path / "result.json"
    report = bench.main([*FAST, "--output", str(output)])
    assert ran == ["qlora", "lora", "full"]
    rows = {row["recipe"]: row for row in json.loads(output.read_text())["results"]}
    assert rows["qlora"]["step_s"] == rows["full"]["step_s"] == 1.0
    assert rows["lora"]["error"].startswith("out of memory: CUDA out of memory")
    assert rows["lora"]["planned_memory_gb"] > 0
    assert report["results"][1] == rows["lora"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the no-CUDA path")
def test_results_are_on_disk_after_each_recipe(tmp_path, monkeypatch):
    """A crash in the third recipe (not an OOM: it propagates) leaves the first two in the file."""
    bench = _load_benchmark()

    def fake_run(recipe, args, shape):
        if recipe == "full":
            raise RuntimeError("the machine went away")
        return {"recipe": recipe, "step_s": 1.0, "tokens_per_s": 1.0, "mfu": None}

    monkeypatch.setattr(bench, "run_recipe", fake_run)
    monkeypatch.setattr(bench, "_print_row", lambda row: None)
    output = tmp_path / "result.json"
    with pytest.raises(RuntimeError, match="went away"):
        bench.main([*FAST, "--output", str(output)])
    saved = json.loads(output.read_text())
    assert [row["recipe"] for row in saved["results"]] == ["qlora", "lora"]
