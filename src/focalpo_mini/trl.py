"""FocalPO inside TRL: ``FocalPOConfig`` and ``FocalPOTrainer``, thin subclasses of TRL 1.16's DPO.

This is the only module of ``focalpo_mini`` that imports ``trl``; install it with
``pip install "focalpo_mini[trl]"``, which pins ``trl==1.16.0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer

from focalpo_mini.losses import DEFAULT_FOCALPO_GAMMA, focalpo_loss
from focalpo_mini.metrics import preference_metrics

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
    must keep their defaults, since FocalPO replaces that loss.
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
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)):
            raise TypeError(f"gamma must be a real number, got {type(self.gamma).__name__}")
        if not math.isfinite(self.gamma) or self.gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")
        if not isinstance(self.detach_weight, bool):
            raise TypeError(
                f"detach_weight must be a bool, got {type(self.detach_weight).__name__}"
            )
        super().__post_init__()  # turns a string loss_type into a list
        for name, default in _DPO_LOSS_DEFAULTS.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name} must be {default!r} for FocalPO (it replaces DPO's loss), "
                    f"got {getattr(self, name)!r}"
                )


class FocalPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with the per-pair DPO loss replaced by :func:`focalpo_loss`.

    Give it a :class:`FocalPOConfig` as ``args``; everything else (datasets, ``ref_model``,
    ``peft_config``, ``precompute_ref_log_probs``, logging) works as for ``DPOTrainer``. It logs
    TRL's usual metrics under TRL's names, gathered across processes as TRL does, plus
    ``focal/weight_mean``, the mean of p**gamma (the fraction of the DPO loss FocalPO keeps).

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
        loss = focalpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=self.beta,
            gamma=args.gamma,
            detach_weight=args.detach_weight,
        )
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            aux_loss = self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item()
            self._metrics[mode]["aux_loss"].append(aux_loss)

        self._log_token_metrics(mode, inputs, outputs, seq_len)
        # One gather of all pairs' log-probs; then the same means TRL takes of its gathered tensors.
        pair_logps = torch.stack(
            [chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps], dim=1
        ).detach()
        gathered = self.accelerator.gather(pair_logps).unbind(dim=1)
        for name, value in preference_metrics(*gathered, beta=self.beta, gamma=args.gamma).items():
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
