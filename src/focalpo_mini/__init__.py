"""focalpo_mini: FocalPO, DPO and focal loss in a library small enough to hold in your head."""

from focalpo_mini.data import make_preference_dataset, true_reward
from focalpo_mini.logprobs import sequence_logps
from focalpo_mini.losses import (
    dpo_loss,
    focal_loss,
    focalpo_loss,
    gradient_weight,
    preference_logits,
)
from focalpo_mini.metrics import preference_metrics
from focalpo_mini.pairs import pair_logps
from focalpo_mini.ranking import ranking_accuracy
from focalpo_mini.sft import supervised_finetune
from focalpo_mini.tiny import make_model, make_tokenizer
from focalpo_mini.trainer import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "TrainConfig",
    "TrainResult",
    "dpo_loss",
    "focal_loss",
    "focalpo_loss",
    "gradient_weight",
    "make_model",
    "make_preference_dataset",
    "make_tokenizer",
    "pair_logps",
    "preference_logits",
    "preference_metrics",
    "ranking_accuracy",
    "sequence_logps",
    "supervised_finetune",
    "train",
    "true_reward",
]
