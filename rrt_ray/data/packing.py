"""Tokenise documents into one token stream and cut it into fixed-length training sequences.

    stream:    d0 d0 d0 <eos> d1 d1 <eos> d2 d2 d2 d2 <eos> ...      (eos after every document)
    sequences: [t0 .. tL] [tL .. t2L] [t2L .. t3L] ...               (seq_len + 1 tokens each, stride seq_len)
    input_ids = sequence[:-1], labels = sequence[1:]                 (they overlap by one token)

Consecutive sequences share their boundary token, so no token of the stream is wasted as a label.
Streams are cached as .npy files (uint16 when the vocabulary fits, else uint32) keyed by a sha256
of the documents' contents and the tokenizer's full definition.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZE_BATCH = 256  # documents per call of the fast (Rust) tokenizer
CACHE_FORMAT = "rrt-tokens-v1"


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def tokenize_texts(texts: Sequence[str], tokenizer: Any) -> np.ndarray:
    """One stream of token ids, eos after every document, as uint16/uint32. (N,)"""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: packing needs one to separate documents")
    dtype, eos = token_dtype(len(tokenizer)), tokenizer.eos_token_id
    pieces = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = list(texts[start:start + TOKENIZE_BATCH])
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: the full tokenizer definition (vocab, merges, specials) and eos."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(str(tokenizer.eos_token_id).encode())
    return digest.hexdigest()


def cache_key(texts: Sequence[str], tokenizer: Any) -> str:
    """sha256 of the documents (in order) and the tokenizer's fingerprint."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return digest.hexdigest()


def tokenize_cached(texts: Sequence[str], tokenizer: Any, cache_dir: str) -> np.ndarray:
    """tokenize_texts, cached in cache_dir/tokens-<key>.npy; returns a read-only memory map."""
    directory = Path(cache_dir).expanduser()
    path = directory / f"tokens-{cache_key(texts, tokenizer)[:32]}.npy"
    if not path.is_file():
        tokens = tokenize_texts(texts, tokenizer)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as handle:
                np.save(handle, tokens)
            os.replace(tmp, path)  # workers of one node may race here: each writes its own tmp
        finally:
            tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def num_sequences(num_tokens: int, seq_len: int) -> int:
    """How many (seq_len + 1)-token sequences, stride seq_len, fit in a stream of num_tokens."""
    return max(0, (num_tokens - 1) // seq_len)
