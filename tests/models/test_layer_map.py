"""The layer map and the init strategies against hand-written expectations."""

import pytest

from rrt_ray.convert.init_strategies import init_source_layers
from rrt_ray.models.layer_map import check_loops, tied_layers, unrolled_positions


def test_cycle_order_runs_the_whole_block_each_loop():
    positions = unrolled_positions(6, 3, "cycle")
    assert [(p.shared, p.depth) for p in positions] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert tied_layers(6, 3, "cycle") == [[0, 2, 4], [1, 3, 5]]  # the authors' |1-3-5 2-4-6|


def test_sequence_order_repeats_each_layer():
    positions = unrolled_positions(6, 3, "sequence")
    assert [(p.shared, p.depth) for p in positions] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert tied_layers(6, 3, "sequence") == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    "strategy, sharing, expected",
    [
        # N=6, B=2, K=3 as in the paper's figure (0-based layer indices)
        ("stepwise", "cycle", [[0], [2], [4]]),
        ("average", "cycle", [[0, 3], [1, 4], [2, 5]]),
        ("lower", "cycle", [[0], [1], [2]]),
        ("stepwise", "sequence", [[0], [2], [4]]),
        ("average", "sequence", [[0, 1], [2, 3], [4, 5]]),
        ("lower", "sequence", [[0], [1], [2]]),
    ],
)
def test_init_strategy_source_layers(strategy, sharing, expected):
    assert init_source_layers(strategy, 6, 2, sharing) == expected


def test_one_loop_initialises_every_shared_layer_from_itself():
    for strategy in ("stepwise", "average", "lower"):
        assert init_source_layers(strategy, 4, 1, "cycle") == [[0], [1], [2], [3]]


def test_bad_loops_and_names_are_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"not divisible by loops=4; allowed loops: \[1, 2, 3, 6\]"):
        check_loops(6, 4)
    with pytest.raises(ValueError, match="allowed: cycle, sequence"):
        unrolled_positions(6, 2, "zigzag")
    with pytest.raises(ValueError, match="allowed: stepwise, average, lower"):
        init_source_layers("middle", 6, 2, "cycle")


def test_middle_cycle_keeps_the_first_and_last_layers_unique():
    positions = unrolled_positions(6, 2, "middle_cycle")
    assert [(p.shared, p.depth) for p in positions] == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (3, 0)]
    assert tied_layers(6, 2, "middle_cycle") == [[0], [1, 3], [2, 4], [5]]  # |1| |2-4 3-5| |6|
    # init strategies work on the looped block (layers 1..4); unique layers start from themselves
    assert init_source_layers("stepwise", 6, 2, "middle_cycle") == [[0], [1], [3], [5]]
    assert init_source_layers("lower", 6, 2, "middle_cycle") == [[0], [1], [2], [5]]
    assert init_source_layers("average", 6, 2, "middle_cycle") == [[0], [1, 3], [2, 4], [5]]


def test_middle_cycle_loops_must_divide_the_middle_layers():
    # SmolLM2's 30 layers: 28 in the middle
    with pytest.raises(ValueError, match=r"28 looped layers \(of 30\) is not divisible by loops=3; allowed loops: \[1, 2, 4, 7, 14, 28\]"):
        check_loops(30, 3, "middle_cycle")
    assert check_loops(30, 2, "middle_cycle") == 14 + 2
