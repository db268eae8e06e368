"""Shared-layer initialisation strategies, as a registry.

Each strategy says which original layers a shared layer is initialised from; W'_k is their mean.
For N=6 original layers, B=2 loops, K=3 shared layers, CYCLE sharing (tied groups |1-4 2-5 3-6|):
    stepwise  every B-th original layer       shared 1,2,3 <- layers 1, 3, 5
    average   mean of the layers tied to it   shared 1,2,3 <- mean(1,4), mean(2,5), mean(3,6)
    lower     the first K layers              shared 1,2,3 <- layers 1, 2, 3
The paper found stepwise best for plain recursive models and average best for relaxed ones whose
LoRA is SVD-initialised (the residuals W_l - W' are then smallest on average).
"""

from __future__ import annotations

from collections.abc import Callable

from rrt_ray.models.layer_map import Sharing, tied_layers

# (shared index k, loops B, the original layers tied to k in depth order) -> source layers
InitStrategy = Callable[[int, int, list[int]], list[int]]


def stepwise(k: int, num_loops: int, tied: list[int]) -> list[int]:
    return [k * num_loops]


def average(k: int, num_loops: int, tied: list[int]) -> list[int]:
    return list(tied)


def lower(k: int, num_loops: int, tied: list[int]) -> list[int]:
    return [k]


INIT_STRATEGIES: dict[str, InitStrategy] = {"stepwise": stepwise, "average": average, "lower": lower}


def init_source_layers(strategy: str, num_layers: int, num_loops: int, sharing: Sharing) -> list[list[int]]:
    """sources[k] = the original layers whose mean initialises shared layer k."""
    if strategy not in INIT_STRATEGIES:
        raise ValueError(f"unknown init {strategy!r}; allowed: {', '.join(INIT_STRATEGIES)}")
    fn = INIT_STRATEGIES[strategy]
    return [fn(k, num_loops, group) for k, group in enumerate(tied_layers(num_layers, num_loops, sharing))]
