"""Corpora, tokenizers and batches for training.

- `load_texts(source, split, max_bytes)`: documents from the embedded default corpus (CPython
  stdlib + Python docs), local .txt/.jsonl/.parquet, s3:// prefixes or hub datasets, with a
  deterministic ~2% held-out split (corpus.py).
- `train_bpe_tokenizer(texts, vocab_size)`: a byte-level BPE `PreTrainedTokenizerFast` (tokenizer.py).
- `tokenize_cached(texts, tokenizer, cache_dir)`: one eos-separated token stream, cached by content
  (packing.py); the loader cuts it into seq_len + 1 windows.
- `ShardedSequenceLoader`: seeded per-epoch shuffle, disjoint rank shards, exact resume;
  `iter_eval_batches`: the held-out set in order (loader.py).
"""

from rrt_ray.data.corpus import DEFAULT_CACHE_DIR, SPLITS, default_corpus_files, is_heldout, load_texts
from rrt_ray.data.loader import ShardedSequenceLoader, iter_eval_batches
from rrt_ray.data.packing import cache_key, token_dtype, tokenize_cached, tokenize_texts
from rrt_ray.data.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer

__all__ = [
    "DEFAULT_CACHE_DIR",
    "SPECIAL_TOKENS",
    "SPLITS",
    "ShardedSequenceLoader",
    "cache_key",
    "default_corpus_files",
    "is_heldout",
    "iter_eval_batches",
    "load_texts",
    "token_dtype",
    "tokenize_cached",
    "tokenize_texts",
    "train_bpe_tokenizer",
]
