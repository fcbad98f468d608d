"""focalpo_mini: FocalPO, DPO and focal loss in a small library that a reader can hold in their head."""

from focalpo_mini.data import make_preference_dataset, true_reward
from focalpo_mini.tiny import make_model, make_tokenizer

__version__ = "0.1.0"

__all__ = [
    "make_model",
    "make_preference_dataset",
    "make_tokenizer",
    "true_reward",
]
