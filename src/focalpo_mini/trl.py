"""FocalPO inside TRL: ``FocalPOConfig`` and ``FocalPOTrainer``, thin subclasses of TRL 1.16's DPO.

This is the only module of ``focalpo_mini`` that imports ``trl``; install it with
``pip install "focalpo_mini[trl]"``, which pins ``trl==1.16.0``.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id

from focalpo_mini._checks import check_flag, check_int, check_number
from focalpo_mini.losses import DEFAULT_FOCALPO_GAMMA, focalpo_loss
from focalpo_mini.metrics import preference_metrics
from focalpo_mini.pairs import check_example

# DPOConfig options that change DPO's loss. FocalPOTrainer computes its own loss, so anything but
# the default would be silently ignored: FocalPOConfig rejects it instead.
_DPO_LOSS_DEFAULTS = {
    "loss_type": ["sigmoid"],
    "loss_weights": None,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "use_weighting": False,
}

# Batch entries that are not model inputs (TRL 1.16's DPOTrainer uses the same set).
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


@dataclass
class FocalPOConfig(DPOConfig):
    """``DPOConfig`` plus FocalPO's two settings.

    Args:
        gamma: exponent of the modulating factor p**gamma, ``>= 0``; 0 is DPO. The default, 0.5,
            is this library's choice (see :func:`focalpo_mini.focalpo_loss`), not the paper's.
        detach_weight: treat p**gamma as a constant in the backward pass.

    Every other field is ``DPOConfig``'s. The ones that select or reshape DPO's loss
    (``loss_type``, ``loss_weights``, ``ld_alpha``, ``f_divergence_type``, ``use_weighting``)
    must keep their defaults, since FocalPO replaces that loss (``loss_type`` may be given as
    ``"sigmoid"`` or ``["sigmoid"]``). ``beta`` must be > 0 and ``max_length`` an integer >= 1
    or None. Numbers may be NumPy scalars (``np.float32``); they are stored as Python numbers.
    These fields are checked when the config is built and again on every later assignment
    (``args.loss_type = ["hinge"]`` raises and leaves the config as it was).
    """

    gamma: float = field(
        default=DEFAULT_FOCALPO_GAMMA,
        metadata={"help": "Exponent of FocalPO's modulating factor p**gamma (>= 0; 0 is DPO)."},
    )
    detach_weight: bool = field(
        default=False,
        metadata={"help": "Treat the factor p**gamma as a constant in the backward pass."},
    )

    def __post_init__(self) -> None:
        for name in _FOCALPO_CHECKS:
            object.__setattr__(self, name, _FOCALPO_CHECKS[name](name, getattr(self, name)))
        super().__post_init__()
        object.__setattr__(self, "_focalpo_checked", True)

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FOCALPO_CHECKS and self.__dict__.get("_focalpo_checked"):
            value = _FOCALPO_CHECKS[name](name, value)
        super().__setattr__(name, value)


def _dpo_loss_default(name: str, value: object) -> object:
    """A field that reshapes DPO's loss, which FocalPO replaces: only its default is allowed."""
    default = _DPO_LOSS_DEFAULTS[name]
    if name == "loss_type" and isinstance(value, str):
        value = [value]  # DPOConfig's own normalisation of a single loss type
    if name == "loss_type" and isinstance(value, (list, tuple)):
        value = list(value)
    if value != default:
        raise ValueError(
            f"{name} must be {default!r} for FocalPO (it replaces DPO's loss), got {value!r}"
        )
    return value


_FOCALPO_CHECKS = {
    "gamma": lambda name, value: check_number(name, value, minimum=0.0),
    "detach_weight": check_flag,
    "beta": lambda name, value: check_number(name, value, minimum=0.0, inclusive=False),
    "max_length": lambda name, value: None if value is None else check_int(name, value, 1),
    **dict.fromkeys(_DPO_LOSS_DEFAULTS, _dpo_loss_default),
}


class FocalPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with the per-pair DPO loss replaced by :func:`focalpo_loss`.

    Give it a :class:`FocalPOConfig` as ``args`` (a plain ``DPOConfig`` is refused: it has no
    ``gamma``; ``args=None`` gives ``FocalPOConfig("<model name>-FocalPO")``, as ``DPOTrainer``
    makes its default); everything else (datasets, ``ref_model``, ``peft_config``,
    ``precompute_ref_log_probs``, logging) works as for ``DPOTrainer``. It logs TRL's usual
    metrics under TRL's names, gathered across processes as TRL does, plus
    ``focal/weight_mean``, the batch mean of the modulating factor p**gamma (each pair's own
    factor; not the fraction of the batch's DPO loss that FocalPO keeps, which weights each
    factor by that pair's DPO loss), and ``nonfinite_fraction`` (below).

    Checks at construction: rows with a ``prompt`` column are validated like
    :func:`focalpo_mini.pairs.prepare_pairs` does (three strings or three lists of
    ``{"role", "content"}`` messages; the error names the row), and a warning counts the pairs
    whose chosen and rejected token ids are the same after TRL's truncation to ``max_length``
    (they have a zero gradient; TRL trains on them anyway).

    Non-finite batches. Where TRL's DPOTrainer would carry on with a NaN loss (and NaN weights
    after the step), a batch whose log-probs (policy or reference) hold NaN or inf gets a loss of
    0 with an exactly-zero gradient instead, a warning naming the step, and counts in
    ``nonfinite_fraction``: the fraction of batches so replaced since the last log (the logged
    ``loss`` averages in those zeros). The optimizer still steps on the zero gradient, so AdamW's
    momentum and weight decay still move the weights a little. A gradient that overflows in the
    backward pass is the Trainer's business (fp16's GradScaler skips such steps).

    Only ``compute_loss`` is overridden. It relies on these internals of TRL 1.16.0, any of which
    a TRL upgrade may move:

    - the collated batch: ``input_ids``, ``attention_mask`` and ``completion_mask``, chosen rows
      stacked over rejected rows, plus ``ref_chosen_logps`` / ``ref_rejected_logps`` when
      ``precompute_ref_log_probs=True``;
    - the fused LM head that ``DPOTrainer.__init__`` installs
      (``trl.trainer.utils.add_fused_lm_head``, with outputs log_probs, entropy, mean_logits and
      is_top1): ``model(..., labels=labels, fused_lm_head=True)``, with prompt and padding labels
      set to -100, returns per-token ``log_probs`` (B, T-1) that are 0 outside the completion;
    - ``self.compute_ref_log_probs(model, inputs)`` for the reference (no_grad, adapter switched
      off under PEFT with ``ref_model=None``);
    - the attributes ``beta``, ``ref_model``, ``precompute_ref_logps``, ``aux_loss_enabled``,
      ``router_aux_loss_coef``, ``_tp_size``, ``_total_train_tokens`` and ``_metrics[mode]``
      (lists of per-step values that ``DPOTrainer.log`` averages).
    """

    def __init__(self, model, ref_model=None, args: FocalPOConfig | None = None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = FocalPOConfig(f"{name.split('/')[-1]}-FocalPO")
        if not isinstance(args, FocalPOConfig):
            raise TypeError(
                f"args must be a FocalPOConfig (DPOConfig plus gamma and detach_weight), got "
                f"{type(args).__name__}; build it with FocalPOConfig(**the same settings)"
            )
        signature = inspect.signature(DPOTrainer.__init__)
        given = signature.bind(self, model, ref_model, args, *rest, **kwargs).arguments
        for name in ("train_dataset", "eval_dataset"):
            for split, dataset in _named_datasets(name, given.get(name)):
                if "prompt" in (getattr(dataset, "column_names", None) or ()):
                    for i, row in enumerate(dataset):
                        check_example(row, f"{split} row {i}")
        super().__init__(model, ref_model, args, *rest, **kwargs)
        for split, dataset in [
            *_named_datasets("train_dataset", self.train_dataset),
            *_named_datasets("eval_dataset", self.eval_dataset),
        ]:
            _warn_identical_after_truncation(dataset, split, args)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The FocalPO loss of one collated batch (a scalar, mean over pairs); logs the metrics.

        Mirrors ``DPOTrainer._compute_loss`` of TRL 1.16 for ``loss_type=["sigmoid"]``, with the
        loss taken from :func:`focalpo_loss`. Like TRL, it ignores ``num_items_in_batch``.
        """
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        # Prompt-learning PEFT prepends virtual tokens to the outputs: keep the real positions.
        seq_len = completion_mask.size(1) - 1
        chosen_logps, rejected_logps = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)

        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = (
                inputs["ref_chosen_logps"],
                inputs["ref_rejected_logps"],
            )
        else:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(ref_model, inputs)

        args = self.args
        pair_logps = torch.stack(
            [chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps], dim=1
        ).detach()
        finite = bool(torch.isfinite(pair_logps).all())
        if finite:
            loss = focalpo_loss(
                chosen_logps,
                rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                beta=self.beta,
                gamma=args.gamma,
                detach_weight=args.detach_weight,
            )
        else:  # a float16/bfloat16 overflow: see the class docstring
            warnings.warn(
                f"{mode} step {self.state.global_step + 1}: a log-prob of this batch is NaN or "
                "inf; its loss is replaced by 0 with a zero gradient",
                stacklevel=2,
            )
            loss = _zero_loss(model)
        # Every process takes part in every gather, whatever its own batch held.
        skipped = self.accelerator.gather(torch.tensor([float(not finite)], device=loss.device))
        self._metrics[mode]["nonfinite_fraction"].append(skipped.mean().item())
        if self.aux_loss_enabled:
            if finite:
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            aux_loss = self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item()
            self._metrics[mode]["aux_loss"].append(aux_loss)

        self._log_token_metrics(mode, inputs, outputs, seq_len)
        # One gather of all pairs' log-probs; then the same means TRL takes of its gathered
        # tensors, over the pairs whose log-probs are finite.
        gathered = self.accelerator.gather(pair_logps)
        gathered = gathered[torch.isfinite(gathered).all(dim=1)].unbind(dim=1)
        if gathered[0].numel():
            metrics = preference_metrics(*gathered, beta=self.beta, gamma=args.gamma)
            for name, value in metrics.items():
                self._metrics[mode][name].append(value)

        if return_outputs:  # for compute_metrics: the fused head builds no logits; recompute them
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_token_metrics(self, mode: str, inputs: dict, outputs, seq_len: int) -> None:
        """TRL 1.16's token-level metrics, computed as ``DPOTrainer._compute_loss`` does:
        ``entropy``, ``num_tokens``, ``logits/chosen``, ``logits/rejected`` and
        ``mean_token_accuracy``.
        """
        gather = self.accelerator.gather_for_metrics
        mask = inputs["completion_mask"][..., 1:]
        chosen_mask, rejected_mask = mask.bool().chunk(2, dim=0)

        entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * mask).sum()).sum()
        total_tokens = gather(mask.sum()).sum()
        entropy = (entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0
        self._metrics[mode]["entropy"].append(entropy)

        if mode == "train":
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        for name, logits, completion in (
            ("logits/chosen", chosen_logits, chosen_mask),
            ("logits/rejected", rejected_logits, rejected_mask),
        ):
            total_logits = gather(logits[completion].sum()).sum().item()
            total = gather(completion.sum()).sum().item()
            self._metrics[mode][name].append(total_logits / total if total > 0 else 0.0)

        chosen_is_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        correct = gather((chosen_is_top1 & chosen_mask).sum()).sum()
        total = gather(chosen_mask.sum()).sum()
        accuracy = (correct / total).item() if total > 0 else 0.0
        self._metrics[mode]["mean_token_accuracy"].append(accuracy)


def _zero_loss(model) -> torch.Tensor:
    """0, with an exactly-zero gradient for every trainable parameter (none of them NaN, since
    it does not go through the forward pass that produced the non-finite log-probs)."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def _named_datasets(name: str, dataset) -> list[tuple[str, object]]:
    """``[(name, dataset)]``; for a dict of eval datasets, one entry per key."""
    if dataset is None:
        return []
    if isinstance(dataset, dict):
        return [(f"{name}[{key!r}]", d) for key, d in dataset.items()]
    return [(name, dataset)]


def _warn_identical_after_truncation(dataset, name: str, args: FocalPOConfig) -> None:
    """Warn about tokenised pairs whose chosen and rejected sequences are the same after TRL
    1.16's collator truncates prompt+completion to ``max_length``."""
    columns = getattr(dataset, "column_names", None) or ()
    if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
        return  # an IterableDataset: not scanned
    keep = slice(None, args.max_length)
    if args.max_length is not None and args.truncation_mode == "keep_end":
        keep = slice(-args.max_length, None)
    identical = sum(
        (prompt + chosen)[keep] == (prompt + rejected)[keep]
        for prompt, chosen, rejected in zip(
            dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True
        )
    )
    if identical:
        warnings.warn(
            f"{name}: {identical} pair(s) of {len(dataset)} have the same chosen and rejected "
            f"token ids after truncation to max_length={args.max_length}; their loss has a zero "
            "gradient (focalpo_mini.train skips such pairs, TRL keeps them)",
            stacklevel=3,
        )
