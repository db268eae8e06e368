"""Held-out perplexity of a causal LM, in one process (demo, benchmarks, quality studies).

`rrt_ray.train.loop.evaluate` is the distributed version used inside training workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], max_batches: int | None = None) -> float:
    """exp(mean next-token cross-entropy) over every label of every batch ({"input_ids", "labels"} (B, L))."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(batch["input_ids"]).logits  # (B, L, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum").item()
        count += batch["labels"].numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity needs at least one held-out batch")
    return math.exp(total / count)
