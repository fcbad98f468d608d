"""Shared test set-up: no test reaches a model hub, and the tiny tokenizer is built once."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from focalpo_mini.tiny import make_tokenizer

    return make_tokenizer()
