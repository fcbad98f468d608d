"""How far the small experiment's numbers move when the CPU's arithmetic changes.

A seeded float32 run repeats to the bit only on the same CPU, kernels and thread count. Another
CPU (say an Intel Xeon instead of this AMD EPYC) changes the order and the width of the sums, and
the last bits move. This script re-runs seed 0 of the main comparison (the reference, DPO and
FocalPO at the default gamma, at their tuned learning rates) under changes of that kind, each in
its own process, and records how far every number moves from the unchanged run:

- ``capability_default`` / ``capability_avx2``: torch's vectorised kernels restricted to plain
  code or AVX2 (``ATEN_CPU_CAPABILITY``), as on a CPU without AVX-512;
- ``two_threads``: two intra-op threads, so reductions are split differently;
- ``float64``: double precision, which shows how much float32 rounding moves the results.

    .venv/bin/python scripts/check_portability.py

writes results/portability.json. tests/test_small_experiment.py takes its cross-machine
tolerance from the largest of these movements.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_small_experiment as experiment

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "small_experiment.json"
METHODS = ("dpo", experiment.DEFAULT_FOCALPO.name)
VARIANTS = {
    "unchanged": {},
    "capability_default": {"env": {"ATEN_CPU_CAPABILITY": "default"}},
    "capability_avx2": {"env": {"ATEN_CPU_CAPABILITY": "avx2"}},
    "two_threads": {"threads": 2},
    "float64": {"dtype": "float64"},
}


def rerun(threads: int = 1, dtype: str = "float32") -> dict:
    """Seed 0 of the main comparison, as the experiment runs it (in this process)."""
    import torch

    committed = json.loads(RESULTS.read_text())
    cfg = experiment.config_from_record(committed["config"], dtype=dtype)
    runs = tuple((m, committed["learning_rates"][m], cfg.noise) for m in METHODS)
    record = experiment.run_seed(experiment.SeedTask(0, runs, cfg=cfg), threads=threads)
    record["fingerprint"] = experiment.machine_fingerprint() | {
        "torch_threads": torch.get_num_threads()
    }
    return record


def _variant(name: str) -> dict:
    """Run one variant in a fresh process, with its environment set before torch starts."""
    spec = VARIANTS[name]
    env = {**os.environ, **spec.get("env", {}), "OMP_NUM_THREADS": str(spec.get("threads", 1))}
    out = subprocess.run(
        [sys.executable, __file__, "--variant", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.split("RESULT", 1)[1])


def main() -> None:
    if sys.argv[1:2] == ["--variant"]:
        spec = VARIANTS[sys.argv[2]]
        record = rerun(spec.get("threads", 1), spec.get("dtype", "float32"))
        print("RESULT" + json.dumps(record))
        return
    records = {name: _variant(name) for name in VARIANTS}
    base = experiment.flatten(records["unchanged"])
    movement: dict[str, dict[str, float]] = {}
    for name, record in records.items():
        flat = experiment.flatten(record)
        movement[name] = {k: abs(flat[k] - v) for k, v in base.items()}
    largest = {k: max(m[k] for m in movement.values()) for k in base}
    out = {
        "command": "python scripts/check_portability.py",
        "variants": {
            k: v | {"fingerprint": records[k]["fingerprint"]} for k, v in VARIANTS.items()
        },
        "movement": movement,
        "largest": largest,
        "answers_changed": {
            name: experiment.answers_changed(records["unchanged"], record)
            for name, record in records.items()
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = ROOT / "results" / "portability.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    for name in VARIANTS:
        moved = {k: v for k, v in movement[name].items() if v > 0}
        top = sorted(moved.items(), key=lambda kv: -kv[1])[:3]
        print(f"{name:<20} {len(moved):>4} of {len(base)} numbers moved; largest: {top}")


if __name__ == "__main__":
    main()
