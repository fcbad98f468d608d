"""Checkpoints of :func:`focalpo_mini.train`: written atomically, refused under a changed config.

A checkpoint holds what a run needs to continue exactly where it stopped: the model, optimizer
and scheduler states, the RNG states, the metric history so far, and the cached reference
log-probs (so a resumed run never needs the reference model). :func:`load` checks the saved
config and a fingerprint of the tokenised data against the current ones.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from focalpo_mini.trainer import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"
# These change what is logged or saved, never the trajectory, so a resumed run may change them.
# max_steps is not among them: it sets the learning-rate decay.
RESUMABLE_FIELDS = (
    "log_every",
    "eval_every",
    "checkpoint_dir",
    "checkpoint_every",
    "progress",
    "record_eval_pairs",
)


def save(state: dict, directory: str | os.PathLike) -> str:
    """Write ``state`` (``state["config"]`` from :func:`config_record`) to
    ``directory/checkpoint.pt``: a temporary file first, then a rename, so a crash never leaves a
    half-written checkpoint. Returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT_NAME)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load(path: str | os.PathLike, config: TrainConfig, fingerprints: dict[str, str]) -> dict:
    """The state saved at ``path`` (a file, or a directory holding ``checkpoint.pt``).

    Raises ValueError, naming what differs, when the checkpoint was written under another config
    (fields outside ``RESUMABLE_FIELDS``) or for other data (``fingerprints``: split name to a
    hash of its tokenised pairs).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, current = state["config"], config_record(config)
    differ = [
        f"{f.name} (checkpoint {saved.get(f.name)!r}, now {current[f.name]!r})"
        for f in fields(config)
        if f.name not in RESUMABLE_FIELDS and saved.get(f.name) != current[f.name]
    ]
    if differ:
        raise ValueError(
            f"checkpoint {path} was written with a different config: {', '.join(differ)}"
        )
    if set(state["splits"]) != set(fingerprints):
        raise ValueError(
            f"checkpoint {path} has splits {sorted(state['splits'])}, now {sorted(fingerprints)}"
        )
    for name, (fingerprint, *_) in state["splits"].items():
        if fingerprint != fingerprints[name]:
            raise ValueError(
                f"{name}_dataset differs from the one checkpoint {path} was written with"
            )
    return state


def config_record(config: TrainConfig) -> dict:
    """The config as a plain dict; a callable loss is recorded by its qualified name."""
    record = asdict(config)
    if callable(config.loss):
        named = config.loss if hasattr(config.loss, "__qualname__") else type(config.loss)
        record["loss"] = f"{named.__module__}.{named.__qualname__}"
    return record


def rng_state() -> dict[str, object]:
    """The CPU (and, when present, every CUDA device's) random-number-generator state."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
