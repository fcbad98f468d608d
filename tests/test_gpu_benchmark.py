"""benchmarks/gpu_7b_step.py without CUDA: the tiny-shape dry run of the same code."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_7b_step", ROOT / "benchmarks/gpu_7b_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the no-CUDA path")
def test_dry_run_trains_each_recipe_and_writes_json(tmp_path):
    bench = _load_benchmark()
    output = tmp_path / "result.json"
    argv = [
        "--steps",
        "2",
        "--warmup",
        "1",
        "--output",
        str(output),
        "--scratch-dir",
        str(tmp_path),
    ]
    report = bench.main(argv)
    assert json.loads(output.read_text()) == report
    assert report["dry_run"] and report["gpu"] == "cpu"
    assert report["skipped"] == ["qlora"]  # 4-bit needs CUDA
    assert [r["recipe"] for r in report["results"]] == ["lora", "full"]

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
        assert row["planned_memory_gb"] > 0
