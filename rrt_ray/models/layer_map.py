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

MIDDLE_CYCLE (Mixture-of-Recursions): the first and last layers stay unique, the middle N-2 are CYCLE-looped.
    N=6, B=2, K=2:  positions 0..5 -> shared 0,1,2,1,2,3 ; depth 0,0,0,1,1,0    tied: |1| |2-4 3-5| |6|

The "depth" of a position is its loop (CYCLE) or repeat (SEQUENCE) index: it selects the position's
own LoRA and norm weights among the copies kept by its shared layer (one copy per layer tied to it; a
layer tied to no other, as middle-cycle's first and last, keeps one copy and needs no LoRA: W' = W_l).

Sharing modes are a registry, SHARING_MODES: a new mode is one `SharingMode` registered here; the
model, the converter, the init strategies, the configs and the CLI all ask this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rrt_ray.registry import Registry

Sharing = str  # a name registered in SHARING_MODES


@dataclass(frozen=True)
class UnrolledPosition:
    position: int  # l: index in execution order == index of the original layer it replaces
    shared: int  # k: which shared layer runs here
    depth: int  # b: which of the shared layer's per-depth parameter copies (LoRA, norms) is used


@dataclass(frozen=True)
class SharingMode:
    """How N original layers fold onto shared layers for B loops.

    order(N, B) -> [(shared k, depth b)] for every unrolled position l in execution order; called
        only with loops that `looped(N)` admits (B divides looped(N)).
    looped(N): how many of the N layers are looped (N for the whole block; fewer when some stay unique).
    loop_exits: a loop ends after a whole pass over the shared block, so an exit can sit between loops.
    help: one line for the CLI.
    """

    order: Callable[[int, int], list[tuple[int, int]]]
    looped: Callable[[int], int] = lambda num_layers: num_layers
    loop_exits: bool = False
    help: str = ""


SHARING_MODES: Registry[SharingMode] = Registry("sharing")


def _cycle(num_layers: int, num_loops: int) -> list[tuple[int, int]]:
    num_shared = num_layers // num_loops
    return [(l % num_shared, l // num_shared) for l in range(num_layers)]


def _sequence(num_layers: int, num_loops: int) -> list[tuple[int, int]]:
    return [(l // num_loops, l % num_loops) for l in range(num_layers)]


SHARING_MODES.register(
    "cycle", SharingMode(_cycle, loop_exits=True, help="cycle: loop the whole block |1-3-5 2-4-6| (exits between loops)")
)
SHARING_MODES.register("sequence", SharingMode(_sequence, help="sequence: repeat each layer B times in a row |1-2-3 4-5-6|"))


def _middle_cycle(num_layers: int, num_loops: int) -> list[tuple[int, int]]:
    """Mixture-of-Recursions' middle-cycle: layer 1 and layer N stay unique (shared 0 and K+1, one depth
    each), the N-2 in between are CYCLE-looped over shared 1..K.  N=6, B=2:  |1| |2-4 3-5| |6|"""
    num_shared = (num_layers - 2) // num_loops
    middle = [(1 + m % num_shared, m // num_shared) for m in range(num_layers - 2)]
    return [(0, 0), *middle, (num_shared + 1, 0)]


SHARING_MODES.register(
    "middle_cycle",
    SharingMode(
        _middle_cycle,
        looped=lambda num_layers: num_layers - 2,
        help="middle_cycle: first and last layers unique, the middle N-2 cycled |1| |2-4 3-5| |6| (loops divide N-2)",
    ),
)


def check_loops(num_layers: int, num_loops: int, sharing: Sharing = "cycle") -> int:
    """Return the number of shared layers, or raise a ValueError naming the bad values and the allowed loops."""
    mode = SHARING_MODES.get(sharing)
    if num_loops < 1:
        raise ValueError(f"loops must be >= 1, got {num_loops}")
    looped = mode.looped(num_layers)
    if looped < 1 or looped % num_loops != 0:
        divisors = [b for b in range(1, looped + 1) if looped % b == 0]
        what = f"layer count {num_layers}" if looped == num_layers else f"{looped} looped layers (of {num_layers})"
        raise ValueError(f"{what} is not divisible by loops={num_loops}; allowed loops: {divisors}")
    return len({k for k, _ in mode.order(num_layers, num_loops)})


def unrolled_positions(num_layers: int, num_loops: int, sharing: Sharing) -> list[UnrolledPosition]:
    """The execution order of the recursive model: one entry per original layer."""
    mode = SHARING_MODES.get(sharing)
    check_loops(num_layers, num_loops, sharing)
    return [UnrolledPosition(position=l, shared=k, depth=b) for l, (k, b) in enumerate(mode.order(num_layers, num_loops))]


def tied_layers(num_layers: int, num_loops: int, sharing: Sharing) -> list[list[int]]:
    """tied[k][b] = the original layer that shared layer k replaces at depth b (one entry per depth it has)."""
    positions = unrolled_positions(num_layers, num_loops, sharing)
    num_shared = 1 + max(p.shared for p in positions)
    by_shared: list[dict[int, int]] = [{} for _ in range(num_shared)]
    for p in positions:
        by_shared[p.shared][p.depth] = p.position
    return [[group[b] for b in sorted(group)] for group in by_shared]
