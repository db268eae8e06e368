"""The token streams a worker trains and evaluates on, from the data config and the model's tokenizer.

A text source is read and tokenised on the node (cached by content); a token set
(`rrt_ray.data.token_sets`, built by `jobs/tokenize_corpus.py`) is streamed shard by shard instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rrt_ray.train.config import DataConfig


def token_arrays(data_cfg: DataConfig, tokenizer: Any) -> tuple[Any, Any]:
    """(train, held-out) token streams: arrays (text sources) or `TokenSetStream`s (token sets)."""
    from rrt_ray import data
    from rrt_ray.data import token_sets

    token_set = token_sets.resolve_token_set(data_cfg.source)
    if token_set is not None:
        return token_set_streams(token_set, data_cfg, tokenizer)
    arrays: list[np.ndarray] = []
    for split in (data_cfg.train_split, data_cfg.eval_split):
        texts = data.load_texts(data_cfg.source, split, data_cfg.max_bytes)
        arrays.append(data.tokenize_cached(texts, tokenizer, data_cfg.cache_dir))
    return arrays[0], arrays[1]


def token_set_streams(uri: str, data_cfg: DataConfig, tokenizer: Any) -> tuple[Any, Any]:
    """The token set's splits, after checking it was made with this model's tokenizer."""
    from rrt_ray.data.packing import tokenizer_fingerprint
    from rrt_ray.data.token_sets import TokenSetStream, load_manifest

    manifest = load_manifest(uri)
    if manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"data.source {uri} was tokenised with another tokenizer ({manifest['tokenizer']['uri']}) than the "
            f"student's: rebuild it with jobs/tokenize_corpus.py --tokenizer <the student's model dir>"
        )
    cache = f"{data_cfg.cache_dir}/token-sets"
    return tuple(TokenSetStream(uri, split, cache, manifest) for split in (data_cfg.train_split, data_cfg.eval_split))
