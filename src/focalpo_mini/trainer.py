"""A preference-optimisation training loop (FocalPO, DPO or any such loss) to read top to bottom.

1. Tokenise and truncate every pair once, as TRL 1.16's DPOTrainer does
   (:mod:`focalpo_mini.pairs` has the truncation policy).
2. Compute the reference log-probs of every train and eval pair once, before training, with the
   policy as given (or ``ref_model``), and keep only those numbers: no reference model in memory.
3. Each step: one forward pass over the chosen rows stacked on the rejected rows
   (:func:`~focalpo_mini.pairs.collate`), the loss from :mod:`focalpo_mini.losses`, AdamW with
   linear warm-up and decay, gradient accumulation and clipping.
4. Log TRL's metric names, the mean focal weight and Chen et al.'s per-group metrics; evaluate on a
   held-out split; checkpoint atomically (:mod:`focalpo_mini.checkpoint`), so that a resumed run
   repeats the uninterrupted one bit for bit on a CPU.
5. Never lose work or train on garbage: Ctrl-C waits for the end of the step, and a step whose
   loss or gradient is not finite is skipped (see :func:`train`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from focalpo_mini import checkpoint
from focalpo_mini._checks import (
    NonFiniteError,
    check_flag,
    check_int,
    check_number,
    first_parameter,
)
from focalpo_mini.baselines import conservative_dpo_loss, ipo_loss, robust_dpo_loss
from focalpo_mini.losses import dpo_loss, focalpo_loss, preference_logits
from focalpo_mini.metrics import group_metrics, preference_metrics
from focalpo_mini.pairs import (
    _check_tokenizer,
    _check_vocabulary,
    all_pair_logps,
    batch_logps,
    collate,
    pad_token_id,
    prepare_pairs,
    to_device,
)

LOSS_NAMES = ("focalpo", "dpo", "cdpo", "robust", "ipo")


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train`. The defaults suit the book's tiny world on a CPU.

    ``loss`` is ``"focalpo"``, ``"dpo"``, one of the noisy-label baselines of
    :mod:`focalpo_mini.baselines` (``"cdpo"``, ``"robust"``, ``"ipo"``; the first two use
    ``label_smoothing``), or a callable with :func:`focalpo_loss`'s signature.
    ``max_grad_norm=None`` turns clipping off (the logged ``grad_norm`` is then the unclipped
    norm). ``learning_rate`` is in (0, 1] (AdamW's step is about the rate itself).
    ``warmup_steps`` may not exceed ``max_steps``. Each step uses ``grad_accum_steps``
    micro-batches of ``batch_size`` pairs; an epoch visits the pairs in a seeded random order,
    and its last ``len(pairs) % batch_size`` pairs (a partial batch) are left out of that epoch.
    ``eval_every=0`` evaluates only before the first and after the last step.
    ``checkpoint_every=0`` checkpoints only on KeyboardInterrupt (when ``checkpoint_dir`` is
    set). ``record_eval_pairs`` keeps per-pair eval tensors.

    Every field is checked when the config is built and again on every later assignment
    (``config.batch_size = 0`` raises, and leaves the config as it was). Values are stored as
    plain Python types, so that a checkpoint holds nothing else: numbers may be Python or NumPy
    scalars and are stored as ``float`` and ``int``, flags as ``bool``, a NumPy string ``loss``
    as ``str``, and ``checkpoint_dir`` (a string or ``os.PathLike``) as ``str``.
    """

    beta: float = 0.1
    loss: str | Callable[..., torch.Tensor] = "focalpo"
    gamma: float = 0.5
    detach_weight: bool = False
    label_smoothing: float = 0.0
    learning_rate: float = 1e-4
    batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: int = 100
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    max_length: int = 1024
    max_prompt_length: int | None = None
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    record_eval_pairs: bool = False
    progress: bool = True

    def __setattr__(self, name: str, value: object) -> None:
        check = _FIELD_CHECKS.get(name)
        if check is None:
            raise AttributeError(f"TrainConfig has no field {name!r}")
        value = check(name, value)
        missing = object()
        previous = self.__dict__.get(name, missing)
        object.__setattr__(self, name, value)
        if all(f in self.__dict__ for f in _FIELD_CHECKS):  # built: check the fields together
            try:
                self._check_together()
            except (TypeError, ValueError):
                if previous is missing:
                    object.__delattr__(self, name)
                else:
                    object.__setattr__(self, name, previous)
                raise

    def _check_together(self) -> None:
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps must be <= max_steps = {self.max_steps}, got {self.warmup_steps}"
            )
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length must be < max_length = {self.max_length}, "
                f"got {self.max_prompt_length}"
            )
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every > 0 needs a checkpoint_dir")


def _loss_field(name: str, value: object) -> object:
    if isinstance(value, str):
        value = str(value)  # a NumPy string becomes a plain one
        if value in LOSS_NAMES:
            return value
    elif callable(value):
        return value
    raise ValueError(f"{name} must be one of {LOSS_NAMES} or a callable, got {value!r}")


def _number_field(minimum: float, *, inclusive: bool = True, maximum: float = math.inf):
    def check(name: str, value: object) -> float:
        return check_number(name, value, minimum=minimum, inclusive=inclusive, maximum=maximum)

    return check


def _int_field(minimum: int, *, optional: bool = False, maximum: int | None = None):
    def check(name: str, value: object) -> int | None:
        return None if optional and value is None else check_int(name, value, minimum, maximum)

    return check


def _optional(check):
    return lambda name, value: None if value is None else check(name, value)


def _path_field(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path or None, got {type(value).__name__} {value!r}")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a text path or None, got {type(path).__name__}")
    if not path or "\x00" in path:
        raise ValueError(f"{name} must be a non-empty path without NUL characters, got {path!r}")
    return path


_FIELD_CHECKS = {
    "beta": _number_field(0.0, inclusive=False),
    "loss": _loss_field,
    "gamma": _number_field(0.0),
    "detach_weight": check_flag,
    "label_smoothing": _number_field(0.0, maximum=0.5),
    "learning_rate": _number_field(0.0, inclusive=False, maximum=1.0),
    "batch_size": _int_field(1),
    "grad_accum_steps": _int_field(1),
    "max_steps": _int_field(1),
    "warmup_steps": _int_field(0),
    "max_grad_norm": _optional(_number_field(0.0, inclusive=False)),
    "weight_decay": _number_field(0.0),
    "max_length": _int_field(1),
    "max_prompt_length": _int_field(1, optional=True),
    "eval_every": _int_field(0),
    "log_every": _int_field(1),
    "seed": _int_field(0, maximum=2**32 - 1),
    "checkpoint_dir": _path_field,
    "checkpoint_every": _int_field(0),
    "record_eval_pairs": check_flag,
    "progress": check_flag,
}


@dataclass
class TrainResult:
    """What :func:`train` returns. The model itself is trained in place.

    ``history``: one dict per log step (``step``, ``loss``, TRL's ``rewards/*`` and ``logps/*``,
    ``focal/weight_mean``, ``groups/*``, ``learning_rate``, ``grad_norm`` (of the log step, before
    clipping), ``num_tokens`` (of the steps applied so far), ``skipped_steps`` (non-finite steps
    skipped so far)). A log window whose steps were all skipped has no loss or pair metrics.
    ``eval_history``: the same metric names on the eval split. ``eval_pairs``: with
    ``record_eval_pairs``, one dict of ``(N,)`` tensors per evaluation (``step``, ``index`` = the
    dataset row, policy and reference log-probs, ``z``). ``data_stats``: truncation counts per
    split. ``train_seconds``: wall time of the loop, evaluations included, after tokenisation and
    the reference cache. The metrics of a log step cover every pair since the previous one.
    """

    history: list[dict[str, float]]
    eval_history: list[dict[str, float]]
    eval_pairs: list[dict]
    config: TrainConfig
    data_stats: dict[str, dict[str, int]]
    train_seconds: float = 0.0

    def series(self, name: str, *, split: str = "train") -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one metric, ready for ``plt.plot(*result.series("loss"))``."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rows = [r for r in (self.history if split == "train" else self.eval_history) if name in r]
        if not rows:
            raise KeyError(f"no {split} metric {name!r}; logged: {self.metric_names(split)}")
        return [r["step"] for r in rows], [r[name] for r in rows]

    def metric_names(self, split: str = "train") -> list[str]:
        rows = self.history if split == "train" else self.eval_history
        return sorted({k for r in rows for k in r} - {"step"})


# --- The loss of a batch -------------------------------------------------------------------


def preference_loss(
    model, batch, ref_chosen_logps, ref_rejected_logps, *, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's loss (mean over pairs) and policy log-probs, as :func:`train` computes them:
    ``(loss, chosen_logps, rejected_logps)``. ``loss.backward()`` gives the step's gradient."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    chosen, rejected = batch_logps(model, batch)
    lengths = batch["completion_mask"].sum(dim=1).chunk(2)
    loss = _configured_loss(
        chosen, rejected, ref_chosen_logps, ref_rejected_logps, config, lengths=lengths
    )
    return loss, chosen, rejected


# --- The loop ---------------------------------------------------------------------------------


@dataclass
class _Split:
    pairs: list[dict[str, list[int]]]
    rows: list[int]
    stats: dict[str, int]
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = hashlib.sha256(repr(self.pairs).encode()).hexdigest()


def train(
    model,
    tokenizer,
    train_dataset,
    eval_dataset=None,
    *,
    config: TrainConfig | None = None,
    ref_model=None,
    resume_from: str | os.PathLike | None = None,
    on_eval: Callable[[int, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on preference pairs and return its metric history.

    The reference is ``model`` as given (or ``ref_model``, used once for the cache): its
    log-probs of every pair are computed before the first step and cached. ``resume_from`` is a
    checkpoint file or directory written by an earlier run with the same config (fields in
    ``checkpoint.RESUMABLE_FIELDS`` may differ), the same model (class, config, module settings,
    parameter shapes and dtypes), the same tokenizer and the same data; a resume refuses
    (ValueError) naming what differs. A callable ``loss`` cannot be identified: another name or
    code is refused, but two callables with the same code may still read different values
    (closures, globals, partial arguments), so a resume with one warns. ``on_eval(step, model)``,
    if given, is called after each evaluation of the eval split (for measurements of your own,
    such as generating answers); the model is put back in training mode after it returns. The
    random state is checkpointed after the evaluation and ``on_eval``, so a resumed run is the
    uninterrupted one bit for bit (on a CPU) whatever ``on_eval`` draws and with dropout on.

    Interrupts. Ctrl-C (SIGINT) takes effect at the end of the current step, after its log row,
    evaluation and checkpoint: the state is checkpointed (with ``checkpoint_dir``) and
    KeyboardInterrupt raised, so a resumed run repeats the uninterrupted one bit for bit. A
    second Ctrl-C stops at once, without a checkpoint (the last one written is kept). A
    KeyboardInterrupt raised inside a step by your own code (a loss callable) checkpoints the
    state after the last completed step. A log row or evaluation an interrupt left undone is
    done on resume.

    Non-finite steps. If a micro-batch's log-probs or loss, or the step's gradient norm, is NaN
    or inf (what a float16/bfloat16 overflow looks like), the step is skipped: no update, the
    optimizer's moments untouched, a warning naming the step, and ``skipped_steps`` in the log
    rows counts it. The step counter, the learning-rate schedule and the data order move on, as
    with ``torch.amp``'s GradScaler, so the skipped batch is not retried. Weights therefore stay
    finite, and :func:`focalpo_mini.checkpoint.save` refuses non-finite weights anyway: the last
    good checkpoint is never overwritten. An evaluation with non-finite log-probs stops the run
    with a NonFiniteError (a ValueError) naming the step.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    device = first_parameter("model", model).device
    if ref_model is not None and not isinstance(ref_model, torch.nn.Module):
        raise TypeError(f"ref_model must be a torch.nn.Module, got {type(ref_model).__name__}")
    if on_eval is not None and not callable(on_eval):
        raise TypeError(f"on_eval must be a callable or None, got {type(on_eval).__name__}")
    _check_tokenizer(tokenizer)
    pad_id = pad_token_id(tokenizer)
    limits = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
    splits = {
        "train": _Split(*prepare_pairs(tokenizer, train_dataset, **limits, name="train_dataset"))
    }
    if eval_dataset is not None:
        splits["eval"] = _Split(
            *prepare_pairs(tokenizer, eval_dataset, **limits, name="eval_dataset")
        )
        if not splits["eval"].pairs:
            raise ValueError(
                f"eval_dataset has no usable pair (counts: {splits['eval'].stats}); pass "
                "eval_dataset=None to train without evaluation"
            )
    train_split = splits["train"]
    for split_name, split in splits.items():
        _check_vocabulary("model", model, split.pairs, f"{split_name}_dataset")
    if len(train_split.pairs) < config.batch_size:
        raise ValueError(
            f"train_dataset has {len(train_split.pairs)} usable pair(s), fewer than "
            f"batch_size={config.batch_size}"
        )

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter that requires grad: nothing to train")
    identity = checkpoint.run_identity(model, tokenizer)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    if resume_from is None:
        if ref_model is not None:
            first_parameter("ref_model", ref_model)
            for name, split in splits.items():
                _check_vocabulary("ref_model", ref_model, split.pairs, f"{name}_dataset")
        for name, split in splits.items():  # the reference: computed once, then only numbers
            try:
                split.ref_chosen, split.ref_rejected = all_pair_logps(
                    model if ref_model is None else ref_model,
                    split.pairs,
                    config.batch_size,
                    pad_id,
                )
            except NonFiniteError as error:
                raise NonFiniteError(f"the reference on {name}_dataset: {error}") from error
        del ref_model
        torch.manual_seed(config.seed)
        run = _Progress(rng=checkpoint.rng_state())
    else:
        state = checkpoint.load(
            resume_from,
            config,
            {k: s.fingerprint for k, s in splits.items()},
            identity=identity,
            model_state=model.state_dict(),
        )
        for name, (_, ref_chosen, ref_rejected) in state["splits"].items():
            splits[name].ref_chosen, splits[name].ref_rejected = ref_chosen, ref_rejected
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        run = _Progress(**state["progress"])
        checkpoint.set_rng_state(run.rng)

    def evaluate() -> None:
        try:
            metrics, pairs = _evaluate(model, splits["eval"], config, pad_id)
        except NonFiniteError as error:
            raise NonFiniteError(f"evaluation at step {run.step}: {error}") from error
        if on_eval is not None:
            try:
                on_eval(run.step, model)
            finally:
                model.train()
        # recorded only once on_eval returned: an evaluation an exception cut short is redone
        # on resume, from the random state it started with
        run.eval_history.append({"step": run.step, **metrics})
        if config.record_eval_pairs:
            run.eval_pairs.append({"step": run.step, **pairs})

    def save() -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": vars(run),
            # informative only: the data position follows from the step (see _batch_indices)
            "data_position": {
                "epoch": run.step * config.grad_accum_steps // per_epoch,
                "batch": run.step * config.grad_accum_steps % per_epoch,
            },
            "config": checkpoint.config_record(config),
            "identity": identity,
            "splits": {k: (s.fingerprint, s.ref_chosen, s.ref_rejected) for k, s in splits.items()},
        }
        checkpoint.save(state, config.checkpoint_dir)

    def log() -> None:
        entry = _summarise(run.pending, config) if run.pending else {}
        lr = scheduler.get_last_lr()[0]
        entry.update(
            learning_rate=lr,
            grad_norm=run.grad_norm,
            num_tokens=run.num_tokens,
            skipped_steps=run.skipped_steps,
        )
        run.history.append({"step": run.step, **entry})
        if "loss" in entry:
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
        run.pending = []

    def finish_step() -> None:
        """The log row and evaluation due at ``run.step``, unless already recorded (a resumed
        run redoes what an interrupt left undone); then the random state, so that a checkpoint
        resumes after whatever the evaluation and ``on_eval`` drew."""
        last = run.step == config.max_steps
        if run.step and (run.step % config.log_every == 0 or last):
            if not run.history or run.history[-1]["step"] != run.step:
                log()
        if "eval" in splits and (
            run.step == 0 or last or (config.eval_every and run.step % config.eval_every == 0)
        ):
            if not run.eval_history or run.eval_history[-1]["step"] != run.step:
                evaluate()
        run.rng = checkpoint.rng_state()

    def accumulate() -> tuple[list, int, str | None]:
        """The forward and backward passes of the step's micro-batches: per-pair records, the
        token count, and why the step must be skipped (None while all is finite so far)."""
        records, tokens = [], 0
        for micro in range(config.grad_accum_steps):
            idx = _batch_indices(run.step * config.grad_accum_steps + micro, train_split, config)
            batch = to_device(collate([train_split.pairs[i] for i in idx], pad_id), device)
            ref = (train_split.ref_chosen[idx].to(device), train_split.ref_rejected[idx].to(device))
            try:
                loss, chosen, rejected = preference_loss(model, batch, *ref, config=config)
            except NonFiniteError as error:  # the model's logits or log-probs overflowed
                return records, tokens, str(error)
            (loss / config.grad_accum_steps).backward()
            records.append((loss.detach(), chosen.detach(), rejected.detach(), *ref))
            tokens += int(batch["attention_mask"].sum())
        return records, tokens, None

    per_epoch = len(train_split.pairs) // config.batch_size
    bar = tqdm(total=config.max_steps, initial=run.step, disable=not config.progress, desc="train")
    model.train()
    start = time.perf_counter()
    with _DeferredInterrupt() as interrupt:
        try:
            finish_step()  # step 0's evaluation, or what an interrupt left undone
            interrupt.check()
            while run.step < config.max_steps:
                records, tokens, problem = accumulate()
                grad_norm = math.nan  # not computed when a forward pass already failed
                if problem is None:
                    grad_norm = _grad_norm(params, config.max_grad_norm)
                    problem = _non_finite(records, grad_norm)
                if problem is None:
                    optimizer.step()
                    scheduler.step()
                else:
                    warnings.warn(
                        f"step {run.step + 1}: {problem}; the step is skipped (no update)",
                        stacklevel=2,
                    )
                    with warnings.catch_warnings():  # torch warns: no optimizer.step() came first
                        warnings.simplefilter("ignore", UserWarning)
                        scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # The step's effects, committed together: a checkpoint written from here on
                # resumes after this step. Ctrl-C cannot land in between (_DeferredInterrupt).
                run.step, run.rng, run.grad_norm = run.step + 1, checkpoint.rng_state(), grad_norm
                if problem is None:
                    run.num_tokens += tokens
                    run.pending.extend(records)
                else:
                    run.skipped_steps += 1
                finish_step()
                if config.checkpoint_every and run.step % config.checkpoint_every == 0:
                    save()
                bar.update(1)
                interrupt.check()
        except KeyboardInterrupt:
            if config.checkpoint_dir is not None and not interrupt.forced:
                save()  # the state after the last completed step; a partial accumulation is lost
            raise
        finally:
            bar.close()
    stats = {k: s.stats for k, s in splits.items()}
    seconds = time.perf_counter() - start
    return TrainResult(run.history, run.eval_history, run.eval_pairs, config, stats, seconds)


@dataclass
class _Progress:
    """Everything about a run that changes from step to step, besides model and optimizer."""

    step: int = 0
    num_tokens: int = 0
    grad_norm: float = math.nan  # of the last step, before clipping
    skipped_steps: int = 0
    rng: dict = field(default_factory=dict)  # the RNG states at the end of the last step
    pending: list = field(default_factory=list)  # per-pair records since the last log
    history: list = field(default_factory=list)
    eval_history: list = field(default_factory=list)
    eval_pairs: list = field(default_factory=list)


class _DeferredInterrupt:
    """While active, a first Ctrl-C (SIGINT) only sets ``pending``, and :meth:`check` raises
    the KeyboardInterrupt at a step boundary, where the state is consistent. A second Ctrl-C
    raises at once and sets ``forced``. Outside the main thread, where Python delivers no
    signals, and where SIGINT is ignored, it changes nothing."""

    def __enter__(self) -> _DeferredInterrupt:
        self.pending = self.forced = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (None, signal.SIG_IGN):
                signal.signal(signal.SIGINT, self._handle)
                self._previous = previous
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending:
            self.forced = True
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The gradients' total 2-norm before clipping; clips them to ``max_norm`` unless None."""
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads])
    ).item()


def _non_finite(records: list[tuple[torch.Tensor, ...]], grad_norm: float) -> str | None:
    """Why a step must be skipped (a loss or the gradient norm is NaN or inf), or None."""
    losses = torch.stack([r[0] for r in records])
    if not bool(torch.isfinite(losses).all()):
        return f"the loss is not finite ({losses.tolist()} over the micro-batches)"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


def _batch_indices(micro_step: int, split: _Split, config: TrainConfig) -> list[int]:
    """The pairs of one micro-batch: epoch e visits the pairs in an order drawn from a generator
    seeded by (seed, e); the last partial batch of an epoch is dropped (see TrainConfig)."""
    epoch, position = divmod(micro_step, len(split.pairs) // config.batch_size)
    order = _epoch_order(len(split.pairs), config.seed, epoch)
    return order[position * config.batch_size : (position + 1) * config.batch_size]


def _summarise(records: list[tuple[torch.Tensor, ...]], config: TrainConfig) -> dict[str, float]:
    """Metrics over the micro-batches since the last log: mean loss, then per-pair metrics."""
    loss = torch.stack([r[0] for r in records]).mean().item()
    chosen, rejected, ref_chosen, ref_rejected = (
        torch.cat(t) for t in list(zip(*records, strict=True))[1:]
    )
    gamma = config.gamma if config.loss == "focalpo" or callable(config.loss) else 0.0
    logps = (chosen, rejected, ref_chosen, ref_rejected)
    return {
        "loss": loss,
        **preference_metrics(*logps, beta=config.beta, gamma=gamma),
        **group_metrics(*logps, beta=config.beta),
    }


def _evaluate(model, split: _Split, config: TrainConfig, pad_id: int):
    chosen, rejected = all_pair_logps(model, split.pairs, config.batch_size, pad_id)
    ref = (split.ref_chosen, split.ref_rejected)
    lengths = tuple(
        torch.tensor([len(p[k]) for p in split.pairs]) for k in ("chosen_ids", "rejected_ids")
    )
    with torch.no_grad():
        loss = _configured_loss(chosen, rejected, *ref, config, lengths=lengths)
    metrics = _summarise([(loss, chosen, rejected, *ref)], config)
    z = preference_logits(chosen, rejected, *ref, beta=config.beta)
    pairs = {
        "index": torch.tensor(split.rows),
        "policy_chosen_logps": chosen,
        "policy_rejected_logps": rejected,
        "ref_chosen_logps": ref[0],
        "ref_rejected_logps": ref[1],
        "z": z,
    }
    return metrics, pairs


def _configured_loss(chosen, rejected, ref_chosen, ref_rejected, config: TrainConfig, *, lengths):
    """The mean loss of a batch; ``lengths`` = (chosen, rejected) completion token counts, (B,)."""
    logps = (chosen, rejected, ref_chosen, ref_rejected)
    if config.loss == "dpo":
        return dpo_loss(*logps, beta=config.beta)
    if config.loss == "cdpo":
        return conservative_dpo_loss(
            *logps, beta=config.beta, label_smoothing=config.label_smoothing
        )
    if config.loss == "robust":
        return robust_dpo_loss(*logps, beta=config.beta, label_smoothing=config.label_smoothing)
    if config.loss == "ipo":
        chosen_lengths, rejected_lengths = lengths
        return ipo_loss(
            *logps,
            beta=config.beta,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
    loss_fn = focalpo_loss if config.loss == "focalpo" else config.loss
    loss = loss_fn(
        *logps,
        beta=config.beta,
        gamma=config.gamma,
        detach_weight=config.detach_weight,
        reduction="mean",
    )
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(
            f"the loss callable (config.loss) must return a scalar tensor, the batch's mean "
            f"loss (it is called with reduction='mean'), got {shape}"
        )
    return loss


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up from 0, then linear decay to 0 at max_steps (transformers' "linear")."""
    if step < config.warmup_steps:
        return step / config.warmup_steps
    return max(0.0, (config.max_steps - step) / max(1, config.max_steps - config.warmup_steps))
