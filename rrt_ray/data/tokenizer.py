"""Byte-level BPE tokenizers trained here (with `tokenizers`), wrapped as `PreTrainedTokenizerFast`.

Byte-level: every string round-trips (decode(encode(s)) == s), no unknown token. Special tokens are
<|pad|>, <|bos|>, <|eos|> with ids 0, 1, 2. None is added by encoding (`add_special_tokens` is a
no-op): packing puts eos after every document itself, and serving sees prompts exactly as trained.
Training is deterministic for the same texts and settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> Any:
    """Train a byte-level BPE tokenizer of at most vocab_size tokens on texts.

    The vocabulary can come out smaller than vocab_size on a small corpus (no pair is merged below
    min_frequency). Returns a `transformers.PreTrainedTokenizerFast`: its `save_pretrained` files load
    with `AutoTokenizer.from_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    return tokenizer
