"""The layer-to-shared-block map: the one place that knows how N original layers fold onto K shared ones.

An N-layer model becomes K = N / B shared layers looped B times. Unrolled position l (0-based, the
order in which the recursive model runs its layers) corresponds one-to-one to original layer l, so
the residual W_l - W'_k of every unrolled position has a well defined original weight.

CYCLE (the paper's default): loop b runs shared layers 0..K-1, then loop b+1 runs them again.
    N=6, B=3, K=2:  positions 0..5 -> shared 0,1,0,1,0,1 ; loop 0,0,1,1,2,2
    tied groups (1-based, as drawn by the authors):  |1-3-5 2-4-6|
SEQUENCE: each shared layer is repeated B times in a row.
    N=6, B=3, K=2:  positions 0..5 -> shared 0,0,0,1,1,1 ; repeat 0,1,2,0,1,2
    tied groups:  |1-2-3 4-5-6|

The "depth" of a position is its loop (CYCLE) or repeat (SEQUENCE) index: it selects the position's
own LoRA and norm weights among the B copies kept by every shared layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Sharing = Literal["cycle", "sequence"]
SHARING_CHOICES: tuple[str, ...] = ("cycle", "sequence")


@dataclass(frozen=True)
class UnrolledPosition:
    position: int  # l: index in execution order == index of the original layer it replaces
    shared: int  # k: which shared layer runs here
    depth: int  # b: which of the shared layer's B per-depth parameter copies (LoRA, norms) is used


def check_loops(num_layers: int, num_loops: int) -> int:
    """Return K = N / B, or raise a ValueError naming the bad values."""
    if num_loops < 1:
        raise ValueError(f"loops must be >= 1, got {num_loops}")
    if num_layers % num_loops != 0:
        divisors = [b for b in range(1, num_layers + 1) if num_layers % b == 0]
        raise ValueError(
            f"layer count {num_layers} is not divisible by loops={num_loops}; allowed loops: {divisors}"
        )
    return num_layers // num_loops


def unrolled_positions(num_layers: int, num_loops: int, sharing: Sharing) -> list[UnrolledPosition]:
    """The execution order of the recursive model: one entry per original layer."""
    if sharing not in SHARING_CHOICES:
        raise ValueError(f"unknown sharing {sharing!r}; allowed: {', '.join(SHARING_CHOICES)}")
    num_shared = check_loops(num_layers, num_loops)
    positions = []
    for l in range(num_layers):
        if sharing == "cycle":
            shared, depth = l % num_shared, l // num_shared
        else:
            shared, depth = l // num_loops, l % num_loops
        positions.append(UnrolledPosition(position=l, shared=shared, depth=depth))
    return positions


def tied_layers(num_layers: int, num_loops: int, sharing: Sharing) -> list[list[int]]:
    """tied[k][b] = the original layer that shared layer k replaces at depth b."""
    num_shared = check_loops(num_layers, num_loops)
    tied: list[list[int]] = [[0] * num_loops for _ in range(num_shared)]
    for p in unrolled_positions(num_layers, num_loops, sharing):
        tied[p.shared][p.depth] = p.position
    return tied
