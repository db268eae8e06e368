"""Held-out perplexity of a causal LM: the one definition, used in one process (demo, benchmarks) and,
summed over ranks, inside training workers (`rrt_ray.train.loop.evaluate`).

Perplexity = exp(sum of next-token CE / number of scored tokens); a label equal to
`rrt_ray.train.losses.IGNORE_INDEX` (-100) is scored in neither the sum nor the count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from rrt_ray.train.losses import IGNORE_INDEX, cross_entropy


@torch.no_grad()
def loss_totals(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], max_batches: int | None = None) -> torch.Tensor:
    """(sum of token CE, scored token count) as float64 (2,), model in eval mode while scoring.
    batches: {"input_ids", "labels"} (B, L), labels already aligned with the logits."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(input_ids=batch["input_ids"]).logits  # (B, L, V)
        count = (batch["labels"] != IGNORE_INDEX).sum()
        totals += torch.stack([cross_entropy(logits, batch["labels"]).double() * count, count.double()])
    model.train(was_training)
    return totals


def perplexity_of(totals: torch.Tensor) -> float:
    """exp(mean token CE) from `loss_totals` (possibly summed over ranks)."""
    if totals[1].item() == 0:
        raise ValueError("perplexity needs at least one scored held-out token")
    return math.exp(totals[0].item() / totals[1].item())


def perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], max_batches: int | None = None) -> float:
    """Held-out perplexity over the batches, in this process."""
    return perplexity_of(loss_totals(model, batches, max_batches))
