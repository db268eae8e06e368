"""The token arrays a worker trains and evaluates on, from the data config and the model's tokenizer."""

from __future__ import annotations

from typing import Any

import numpy as np

from rrt_ray.train.config import DataConfig


def token_arrays(data_cfg: DataConfig, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) token ids, tokenised once per node and corpus (cached by content)."""
    from rrt_ray import data

    arrays = []
    for split in (data_cfg.train_split, data_cfg.eval_split):
        texts = data.load_texts(data_cfg.source, split, data_cfg.max_bytes)
        arrays.append(data.tokenize_cached(texts, tokenizer, data_cfg.cache_dir))
    return arrays[0], arrays[1]
