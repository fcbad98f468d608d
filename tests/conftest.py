"""Shared test set-up: no test reaches a model hub, the tiny tokenizer is built once, and the
training tests share one small model and one intra-op thread."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    from focalpo_mini.tiny import make_tokenizer

    return make_tokenizer()


@pytest.fixture
def small_model(tokenizer):
    """``small_model(seed=0)``: a one-layer model of the tiny world, small enough to train in
    a test."""
    from focalpo_mini.tiny import make_model

    def make(seed=0):
        return make_model(
            tokenizer,
            seed=seed,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module that trains tiny models: on a shared 2-core machine a
    second thread only adds contention (it made the trainer tests several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
