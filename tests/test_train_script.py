"""scripts/train_focalpo.py trains on two real processes (gloo DDP on a CPU), in smoke mode.

``accelerate launch --cpu --num_processes 2`` would silently run one process, so the test uses
torchrun, and checks the world size each process saw rather than trusting the launcher.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_two_processes_train_the_full_recipe(tmp_path):
    # The full recipe precomputes reference log-probs: the path that needs the on-disk dataset.
    command = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "scripts" / "train_focalpo.py"),
        "--smoke",
        "--recipe",
        "full",
        "--num-samples",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "ranks").glob("rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 for r in records)
    steps = records[0]["plan"]["max_steps"]
    assert all(r["plan"]["num_processes"] == 2 for r in records)
    assert steps > 0
    assert all(r["global_step"] == steps for r in records)
    # The logged loss is averaged over processes, so both ranks report the same value.
    assert records[0]["last_loss"] == records[1]["last_loss"]
    assert (tmp_path / "model.safetensors").is_file()
    assert "2 process(es)" in result.stdout


def test_accelerate_configs_parse_and_target_eight_bf16_gpus():
    """ZeRO-3 for the full recipe, DDP for the LoRA recipes. No FSDP config: check_launch refuses
    every recipe under FSDP (tests/test_recipes.py)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    expected = {
        "deepspeed_zero3_8gpu.yaml": DistributedType.DEEPSPEED,
        "ddp_8gpu.yaml": DistributedType.MULTI_GPU,
    }
    configs = sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert configs == sorted(expected)
    for name, kind in expected.items():
        config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / name))
        assert config.distributed_type == kind
        assert (config.num_processes, config.mixed_precision, config.use_cpu) == (8, "bf16", False)
    zero3 = ClusterConfig.from_yaml_file(str(ROOT / "configs/accelerate/deepspeed_zero3_8gpu.yaml"))
    assert zero3.deepspeed_config["zero_stage"] == 3
    # Partitioned loading: recipes.load_model_and_tokenizer builds the arguments first.
    assert zero3.deepspeed_config["zero3_init_flag"] is True


def test_deepspeed_is_an_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("deepspeed") for dep in extras["deepspeed"])
