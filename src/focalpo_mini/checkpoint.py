"""Checkpoints of :func:`focalpo_mini.train`: written atomically, refused under a changed config.

A checkpoint holds what a run needs to continue exactly where it stopped: the model, optimizer
and scheduler states, the RNG states, the metric history so far, and the cached reference
log-probs (so a resumed run never needs the reference model). :func:`load` checks the saved
config, the model (class, config, module settings, parameter names, shapes and dtypes), the
tokenizer and a fingerprint of the tokenised data against the current ones. A checkpoint holds
only plain types (str, int, float, bool, None, lists and dicts of them, tensors), so
``torch.load(weights_only=True)`` reads every checkpoint this module writes.

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
import json
import os
import tempfile
import types
import warnings
from dataclasses import fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from focalpo_mini.trainer import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"
MAGIC = b"focalpo_mini checkpoint v1\n"
STATE_KEYS = ("model", "optimizer", "scheduler", "progress", "config", "splits", "identity")
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
    ``directory/checkpoint.pt``, with its checksum, by :func:`write_atomically`, so a crash never
    leaves a half-written checkpoint and no planted link is ever followed.

    Refuses (ValueError) a state whose model weights hold NaN or inf, so a broken state never
    replaces the last good checkpoint, and (TypeError) a state holding anything but plain types
    (str, int, float, bool, None, lists, tuples and dicts of them, tensors), which
    ``torch.load(weights_only=True)`` could not read back. Returns the path.
    """
    if not isinstance(state, dict) or set(STATE_KEYS) - set(state):
        raise ValueError(f"state must be a dict with the keys {list(STATE_KEYS)}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    _check_plain(state, "state")
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
    write_atomically(path, MAGIC + hashlib.sha256(payload).digest() + payload)
    return path


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file ``path`` by ``data``, atomically and safely.

    The data goes to a new temporary file in the same folder, created exclusively (``O_EXCL``,
    through :func:`tempfile.mkstemp`, with a random name): an existing file or symbolic link of
    that name is never opened, so a link planted next to ``path`` cannot redirect the write. The
    file is flushed to disk (``fsync``) and renamed over ``path``; ``os.replace`` replaces a link
    at ``path`` itself rather than writing through it. On any error the temporary file is
    removed and ``path`` is left as it was.
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"path must be a text path, got {type(path).__name__}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


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
        missing = sorted(set(STATE_KEYS) - set(state)) if isinstance(state, dict) else STATE_KEYS
        raise ValueError(
            f"checkpoint {path} does not hold a training state {list(STATE_KEYS)} (missing "
            f"{list(missing)}; a checkpoint of an older focalpo_mini cannot be resumed)"
        )
    return state


def load(
    path: str | os.PathLike,
    config: TrainConfig,
    fingerprints: dict[str, str],
    identity: dict | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> dict:
    """The state saved at ``path`` (a file, or a directory holding ``checkpoint.pt``), checked
    by :func:`read`.

    Raises ValueError, naming what differs, when the checkpoint was written under another config
    (fields outside ``RESUMABLE_FIELDS``), for another model (``identity`` from
    :func:`run_identity`: class, config, module settings; ``model_state``: parameter names,
    shapes and dtypes), another tokenizer, or other data (``fingerprints``: split name to a hash
    of its tokenised pairs).

    A callable ``loss`` cannot be identified: two callables with the same name and code may
    still differ in what they read (closure values, globals, ``functools.partial`` arguments,
    object attributes). A different name or code is refused; otherwise a warning says the
    identity could not be established. Nothing is compared through printed text.
    """
    state = read(path)
    path = os.fspath(path)
    saved, current = state["config"], config_record(config)
    differ = [
        f"{f.name} (checkpoint {saved.get(f.name)!r}, now {current[f.name]!r})"
        for f in fields(config)
        if f.name not in (*RESUMABLE_FIELDS, "loss") and saved.get(f.name) != current[f.name]
    ]
    loss_difference = _loss_difference(saved.get("loss"), current["loss"])
    if loss_difference:
        differ.insert(1, loss_difference)
    if differ:
        raise ValueError(
            f"checkpoint {path} was written with a different config: {', '.join(differ)}"
        )
    if isinstance(current["loss"], dict):
        warnings.warn(
            f"resuming from {path} with a callable loss ({current['loss']['name']}): its name and "
            "code match the checkpoint's, but what it reads (closure values, globals, partial "
            "arguments) cannot be compared; make sure it is the loss the run started with",
            stacklevel=3,
        )
    if identity is not None:
        _check_identity(path, state["identity"], identity)
    if model_state is not None:
        _check_weights(path, state["model"], model_state)
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
    """The config as a dict of plain types; a callable loss is recorded by its name and a hash
    of its code (see :func:`load` for what that can and cannot tell apart)."""
    from focalpo_mini.trainer import TrainConfig

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    record = {f.name: getattr(config, f.name) for f in fields(config)}
    if callable(config.loss):
        record["loss"] = {"name": _callable_name(config.loss), "code": _code_digest(config.loss)}
    return record


def run_identity(model: torch.nn.Module, tokenizer) -> dict:
    """What a resume must find unchanged besides the config and data, as plain types: the
    model's class, its ``config`` (a Hugging Face model's, without version fields), the settings
    of every submodule (plain attributes such as a dropout's ``p`` or a norm's ``eps``, and
    each submodule's class), and a SHA-256 of the tokenizer (its class, vocabulary and merges,
    special tokens and chat template)."""
    model_config = getattr(model, "config", None)
    config = None
    if hasattr(model_config, "to_dict"):
        config = {k: v for k, v in model_config.to_dict().items() if k not in _VOLATILE_CONFIG}
    modules = [
        [name, _qualified(type(module)), _plain_attributes(module)]
        for name, module in model.named_modules()
    ]
    return _plain(
        {
            "model_class": _qualified(type(model)),
            "model_config": config,
            "modules": modules,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A SHA-256 of what decides a tokenizer's ids: its class, its full serialisation (a fast
    tokenizer's vocabulary, merges, normaliser and added tokens) or else its vocabulary, its
    special tokens and its chat template."""
    parts: dict[str, object] = {"class": _qualified(type(tokenizer))}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        parts["backend"] = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        parts[name] = getattr(tokenizer, name, None)
    text = json.dumps(_plain(parts), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


_VOLATILE_CONFIG = {"transformers_version", "_name_or_path", "_commit_hash"}
_IDENTITY_NAMES = {
    "model_class": "the model's class",
    "model_config": "the model's config",
    "modules": "the model's modules",
    "tokenizer": "the tokenizer",
}


def _check_identity(path: str, saved: dict, current: dict) -> None:
    for key, label in _IDENTITY_NAMES.items():
        if saved.get(key) == current.get(key):
            continue
        detail = ""
        if key == "model_config" and isinstance(saved.get(key), dict) and current.get(key):
            old, new = saved[key], current[key]
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            detail = ": " + ", ".join(
                f"{k} (checkpoint {old.get(k)!r}, now {new.get(k)!r})" for k in changed[:8]
            )
        elif key == "modules":
            pairs = zip(saved.get(key) or [], current.get(key) or [], strict=False)
            first = next(((a, b) for a, b in pairs if a != b), None)
            if first is not None:
                name = first[1][0] or "(root)"
                detail = f": module {name!r} was {first[0][1:]}, now {first[1][1:]}"
        elif key == "tokenizer":
            detail = " (another vocabulary, merges, special tokens or chat template)"
        elif key == "model_class":
            detail = f" (checkpoint {saved.get(key)}, now {current.get(key)})"
        raise ValueError(
            f"checkpoint {path} was written with a different {label.removeprefix('the ')}"
            f"{detail}; resume with the model and tokenizer the run started with, or start a "
            "new run without resume_from"
        )


def _check_weights(path: str, saved: dict, current: dict) -> None:
    if set(saved) != set(current):
        missing, extra = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
        raise ValueError(
            f"checkpoint {path} holds other parameters than the model: checkpoint only "
            f"{missing[:5]}, model only {extra[:5]}"
        )
    for name, tensor in saved.items():
        now = current[name]
        if tensor.shape != now.shape or tensor.dtype != now.dtype:
            raise ValueError(
                f"checkpoint {path} has {name} as {tuple(tensor.shape)} {tensor.dtype}, the "
                f"model as {tuple(now.shape)} {now.dtype}: resume with the model's original "
                "shape and dtype"
            )


def _loss_difference(saved: object, current: object) -> str | None:
    """Why the saved and current loss records differ, or None when they may be the same."""
    if isinstance(saved, dict) and isinstance(current, dict):
        if saved.get("name") == current["name"] and saved.get("code") == current["code"]:
            return None
        what = "name" if saved.get("name") != current["name"] else "code"
        return (
            f"loss (checkpoint callable {saved.get('name')}, now {current['name']}; its {what} "
            "differs)"
        )
    if saved == current:
        return None
    shown = [f"callable {r['name']}" if isinstance(r, dict) else repr(r) for r in (saved, current)]
    return f"loss (checkpoint {shown[0]}, now {shown[1]})"


def _callable_name(fn) -> str:
    if isinstance(fn, functools.partial):
        return f"functools.partial({_callable_name(fn.func)})"
    if inspect.ismethod(fn):
        return f"{_callable_name(fn.__func__)} (bound method)"
    if inspect.isfunction(fn) or inspect.isbuiltin(fn):
        return f"{fn.__module__}.{fn.__qualname__}"
    return f"{_qualified(type(fn))} object"


def _code_digest(fn) -> str | None:
    """A hash of the bytecode that runs (the function's, a partial's function's, or a callable
    object's ``__call__``); None when there is no Python code to hash."""
    if isinstance(fn, functools.partial):
        return _code_digest(fn.func)
    if inspect.ismethod(fn):
        fn = fn.__func__
    if not inspect.isfunction(fn):
        fn = inspect.getattr_static(type(fn), "__call__", None)
        if not inspect.isfunction(fn):
            return None
    return hashlib.sha256(_code_text(fn.__code__).encode()).hexdigest()[:16]


def _code_text(code: types.CodeType) -> str:
    """The bytecode, names and constants of ``code`` (nested code objects included): not its
    file name or line numbers, which change when a notebook cell is re-run."""
    consts = [
        _code_text(c)
        if isinstance(c, types.CodeType)
        else repr(sorted(c, key=repr) if isinstance(c, frozenset) else c)  # sets: a fixed order
        for c in code.co_consts
    ]
    return f"{code.co_code.hex()} {code.co_names} {code.co_varnames} {consts}"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain_attributes(module: torch.nn.Module) -> dict:
    """A module's public attributes of plain scalar types (a dropout's p, a norm's eps...)."""
    return {
        k: v
        for k, v in sorted(vars(module).items())
        if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))
    }


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size)


def _check_plain(value: object, where: str) -> None:
    """TypeError naming the first value under ``where`` that is not a plain type."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN) or type(value).__module__ == "numpy":
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}; a checkpoint "
            "holds only plain types (str, int, float, bool, None, lists and dicts, tensors)"
        )


def _plain(value: object) -> object:
    """``value`` as JSON's plain types (a tuple becomes a list, anything else its ``str``)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def rng_state() -> dict[str, object]:
    """The CPU (and, when present, every CUDA device's) random-number-generator state."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    """Restore what :func:`rng_state` returned."""
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.ByteTensor):
        raise TypeError("state must be what rng_state() returned: a dict with a 'cpu' ByteTensor")
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
