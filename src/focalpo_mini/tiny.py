"""The tiny world's tokenizer and model: built locally from code, so nothing is downloaded.

``make_tokenizer()`` trains a byte-level BPE on the sorting task's text in about a second;
``make_model(tokenizer)`` builds a seeded Llama of under 1M parameters from a config.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from focalpo_mini._checks import check_int
from focalpo_mini.data import tokenizer_corpus

MAX_VOCAB_SIZE = 1_000_000

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]

# Each message is "<|role|>content<|eos|>"; with add_generation_prompt the template ends on
# "<|assistant|>", so TRL can split a rendered conversation into prompt and completion.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|eos|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DEFAULT_MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def make_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train the tiny world's byte-level BPE tokenizer (deterministic, about a second on a CPU).

    Byte-level means every string round-trips exactly through encode/decode. The tokenizer has
    pad/bos/eos tokens and a chat template, so TRL accepts both plain and conversational data.
    ``vocab_size`` is an upper bound: BPE stops adding merges when the corpus offers no more, so
    the learned vocabulary can be smaller; ``len(tokenizer)`` is its true size.

    Raises:
        TypeError, ValueError: unless ``vocab_size`` is an integer from 262 (the 256 bytes and
            the special tokens) to ``MAX_VOCAB_SIZE``.
    """
    vocab_size = check_int("vocab_size", vocab_size, 256 + len(SPECIAL_TOKENS), MAX_VOCAB_SIZE)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(
    tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **config_overrides
) -> LlamaForCausalLM:
    """Build a small, seeded ``LlamaForCausalLM`` (under 1M parameters with the defaults and the
    tiny world's tokenizer; ``model.num_parameters()`` gives the exact count).

    The same seed gives bit-identical weights; the global RNG is left untouched. Any field of
    ``LlamaConfig`` can be overridden, e.g. ``make_model(tok, num_hidden_layers=2)``.

    Raises:
        TypeError: if ``tokenizer`` is not a tokenizer (it needs ``len()`` and pad/bos/eos token
            ids) or ``seed`` not an integer.
        ValueError: if an override is not a ``LlamaConfig`` field, or the overrides do not build
            a model (the message names them); if ``seed`` is negative.
    """
    if not hasattr(tokenizer, "__len__") or not hasattr(tokenizer, "pad_token_id"):
        raise TypeError(
            "tokenizer must be a Hugging Face tokenizer (with len() and pad/bos/eos token ids), "
            f"got {type(tokenizer).__name__}"
        )
    seed = check_int("seed", seed, 0, maximum=2**63 - 1)
    known = set(LlamaConfig().to_dict())
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown}; expected LlamaConfig fields")
    settings = {**DEFAULT_MODEL_CONFIG, **config_overrides}
    try:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **settings,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, OverflowError) as error:
        raise ValueError(
            f"the config overrides {config_overrides} do not build a LlamaForCausalLM: "
            f"{type(error).__name__}: {error}"
        ) from error
    return model
