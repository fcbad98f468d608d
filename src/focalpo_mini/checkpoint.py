"""Checkpoints of :func:`focalpo_mini.train`: written atomically, refused under a changed config.

A checkpoint holds what a run needs to continue exactly where it stopped: the model, optimizer
and scheduler states, the RNG states, the metric history so far, and the cached reference
log-probs (so a resumed run never needs the reference model). :func:`load` checks the saved
config and a fingerprint of the tokenised data against the current ones.

The file is a header line, the SHA-256 of the payload, and the payload (``torch.save`` of the
state): :func:`read` refuses a file whose payload does not match its checksum, so a single
flipped bit anywhere is caught, where ``torch.load`` alone would load most such damage silently.
The payload is built in memory, which suits this library's small models.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import re
import types
from dataclasses import asdict, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from focalpo_mini.trainer import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"
MAGIC = b"focalpo_mini checkpoint v1\n"
STATE_KEYS = ("model", "optimizer", "scheduler", "progress", "config", "splits")
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
    ``directory/checkpoint.pt``, with its checksum: a temporary file first, flushed to disk
    (``fsync``), then a rename, so a crash never leaves a half-written checkpoint.

    Refuses (ValueError) a state whose model weights hold NaN or inf, so a broken state never
    replaces the last good checkpoint. Returns the path.
    """
    broken = [
        k for k, v in state["model"].items() if v.is_floating_point() and not v.isfinite().all()
    ]
    if broken:
        raise ValueError(
            f"not saving a checkpoint whose weights hold NaN or inf ({', '.join(broken[:5])}); "
            "the last checkpoint is kept"
        )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT_NAME)
    with open(path + ".tmp", "wb") as file:
        file.write(MAGIC + hashlib.sha256(payload).digest() + payload)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".tmp", path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    return path


def read(path: str | os.PathLike) -> dict:
    """The state saved at ``path`` (a file, or a directory holding ``checkpoint.pt``), after
    checking its checksum. Raises ValueError for an empty, damaged or foreign file (a model
    ``state_dict`` saved with ``torch.save`` is not a checkpoint)."""
    if not isinstance(path, (str, os.PathLike)):
        hint = (
            " (a state_dict? load it with model.load_state_dict)" if isinstance(path, dict) else ""
        )
        raise TypeError(
            f"resume_from must be the path of a checkpoint file or directory, got "
            f"{type(path).__name__}{hint}"
        )
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    with open(path, "rb") as file:
        data = file.read()
    if not data:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): it was never written completely")
    if not data.startswith(MAGIC):
        raise ValueError(
            f"{path} is not a focalpo_mini checkpoint (no checkpoint header); a model "
            "state_dict saved with torch.save is loaded with model.load_state_dict(torch.load("
            "path)), then train without resume_from"
        )
    digest, payload = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"checkpoint {path} is damaged: its SHA-256 checksum does not match")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or set(STATE_KEYS) - set(state):
        raise ValueError(f"checkpoint {path} does not hold a training state {list(STATE_KEYS)}")
    return state


def load(path: str | os.PathLike, config: TrainConfig, fingerprints: dict[str, str]) -> dict:
    """The state saved at ``path`` (a file, or a directory holding ``checkpoint.pt``), checked
    by :func:`read`.

    Raises ValueError, naming what differs, when the checkpoint was written under another config
    (fields outside ``RESUMABLE_FIELDS``) or for other data (``fingerprints``: split name to a
    hash of its tokenised pairs).
    """
    state = read(path)
    path = os.fspath(path)
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
    """The config as a plain dict; a callable loss is recorded by :func:`callable_identity`."""
    record = asdict(config)
    if callable(config.loss):
        record["loss"] = callable_identity(config.loss)
    return record


def callable_identity(fn) -> str:
    """A text that tells two loss callables apart, the same in every process.

    A function (a lambda included) is its qualified name plus a hash of its code, default
    arguments and closure values, so two lambdas that compute different things differ. A
    ``functools.partial`` is its function plus its arguments. Any other callable object is its
    class and the code of its ``__call__``, plus its ``repr`` if the class defines one; its
    attributes are not compared otherwise.
    """
    if isinstance(fn, functools.partial):
        args = [_value_identity(a) for a in fn.args]
        args += [f"{k}={_value_identity(v)}" for k, v in sorted(fn.keywords.items())]
        return f"functools.partial({callable_identity(fn.func)}, {', '.join(args)})"
    if inspect.isfunction(fn):
        return f"{fn.__module__}.{fn.__qualname__} [{_function_digest(fn)}]"
    if inspect.ismethod(fn):
        return f"{callable_identity(fn.__func__)} of {_value_identity(fn.__self__)}"
    return _value_identity(fn)


def _value_identity(value) -> str:
    if isinstance(value, functools.partial) or inspect.isfunction(value) or inspect.ismethod(value):
        return callable_identity(value)
    cls = type(value)
    if cls.__repr__ is not object.__repr__:
        return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))  # addresses differ per process
    call = inspect.getattr_static(cls, "__call__", None)
    digest = f" [{_function_digest(call)}]" if inspect.isfunction(call) else ""
    return f"{cls.__module__}.{cls.__qualname__} object{digest}"


def _function_digest(fn: types.FunctionType) -> str:
    parts = [
        _code_text(fn.__code__),
        _value_identity(fn.__defaults__),
        _value_identity(fn.__kwdefaults__),
        *(_value_identity(cell.cell_contents) for cell in fn.__closure__ or ()),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _code_text(code: types.CodeType) -> str:
    consts = [
        _code_text(c)
        if isinstance(c, types.CodeType)
        else repr(sorted(c, key=repr) if isinstance(c, frozenset) else c)  # sets: a fixed order
        for c in code.co_consts
    ]
    return f"{code.co_code.hex()} {code.co_names} {code.co_varnames} {consts}"


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
