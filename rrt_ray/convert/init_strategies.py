"""Shared-layer initialisation strategies, as a registry (INIT_STRATEGIES).

Each strategy says which original layers a shared layer is initialised from; W'_k is their mean.
For N=6 original layers, B=2 loops, K=3 shared layers, CYCLE sharing (tied groups |1-4 2-5 3-6|):
    stepwise  every B-th original layer       shared 1,2,3 <- layers 1, 3, 5
    average   mean of the layers tied to it   shared 1,2,3 <- mean(1,4), mean(2,5), mean(3,6)
    lower     the first K layers              shared 1,2,3 <- layers 1, 2, 3
The paper found stepwise best for plain recursive models and average best for relaxed ones whose
LoRA is SVD-initialised (the residuals W_l - W' are then smallest on average).

"Original layers" means those of the looped block: a layer that a sharing mode keeps unique (tied to
no other) is always initialised from itself, whatever the strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rrt_ray.models.layer_map import Sharing, tied_layers
from rrt_ray.registry import Registry


@dataclass(frozen=True)
class SharedGroup:
    """What a strategy sees about one looped shared layer."""

    index: int  # its place among the looped block's shared layers, 0..K-1
    num_loops: int  # B
    tied: tuple[int, ...]  # the original layers tied to it, in depth order
    block: tuple[int, ...]  # every original layer of the looped block, in order (N of them when all loop)


InitStrategy = Callable[[SharedGroup], list[int]]  # -> the original layers whose mean initialises it
INIT_STRATEGIES: Registry[InitStrategy] = Registry("init")


@INIT_STRATEGIES.register("stepwise")
def stepwise(group: SharedGroup) -> list[int]:
    return [group.block[group.index * group.num_loops]]


@INIT_STRATEGIES.register("average")
def average(group: SharedGroup) -> list[int]:
    return list(group.tied)


@INIT_STRATEGIES.register("lower")
def lower(group: SharedGroup) -> list[int]:
    return [group.block[group.index]]


def init_source_layers(strategy: str, num_layers: int, num_loops: int, sharing: Sharing) -> list[list[int]]:
    """sources[k] = the original layers whose mean initialises shared layer k."""
    fn = INIT_STRATEGIES.get(strategy)
    tied = tied_layers(num_layers, num_loops, sharing)
    looped = [k for k, group in enumerate(tied) if len(group) == num_loops]
    block = tuple(sorted(layer for k in looped for layer in tied[k]))
    sources = [list(group) for group in tied]  # unique layers: themselves
    for index, k in enumerate(looped):
        sources[k] = fn(SharedGroup(index, num_loops, tuple(tied[k]), block))
    return sources
