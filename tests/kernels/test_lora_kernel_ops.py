"""The Triton launchers one by one against their torch references, and the torch CPU strategies."""

from __future__ import annotations

import pytest
import torch
from lora_cases import (
    BF16_TOL,
    FP32_TOL,
    PATTERNS,
    SHAPES,
    assert_close_rel,
    forward_backward,
    make_depth_index,
    make_lora,
)

from rrt_ray.kernels import torch_ops, triton_ops
from rrt_ray.kernels.segments import depth_runs, sort_by_depth


def test_sort_by_depth_groups_tokens():
    seg = sort_by_depth(torch.tensor([1, 0, -1, 1, 0]), num_depths=3)
    assert seg.sorted_token_ids.tolist() == [2, 1, 4, 0, 3]
    assert seg.seg_start.tolist() == [1, 3, 5] and seg.seg_len.tolist() == [2, 2, 0]


def test_depth_runs_and_their_cache():
    idx = torch.tensor([[-1, 0, 0, 1, 1, 1]])  # (1, T): the shape the engine sets on a layer
    assert depth_runs(idx) == [(-1, 0, 1), (0, 1, 3), (1, 3, 6)]
    assert depth_runs(idx.reshape(-1)) == [(-1, 0, 1), (0, 1, 3), (1, 3, 6)]  # a view: same answer
    idx[0, 2] = 1  # an in-place write must not be answered from the cache
    assert depth_runs(idx) == [(-1, 0, 1), (0, 1, 2), (1, 2, 6)]
    assert depth_runs(torch.tensor([1, 0, 1])) == [(1, 0, 1), (0, 1, 2), (1, 2, 3)]
    assert depth_runs(torch.zeros(0, dtype=torch.long)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", ["odd", "real_r64"])
def test_gather_matmul(shape, transposed, dtype):
    num_tokens, k, n, _, num_depths = SHAPES[shape]
    inp = torch.randn(num_tokens, k, dtype=dtype)
    # A transposed view is how the backward passes A^T and B^T: strides (N*K, 1, N), no copy.
    if transposed:
        weight = torch.randn(num_depths, k, n, dtype=dtype).transpose(1, 2)  # (D, N, K)
    else:
        weight = torch.randn(num_depths, n, k, dtype=dtype)  # (D, N, K)
    idx = make_depth_index("mixed", num_tokens, num_depths)
    got = triton_ops.gather_matmul(inp, weight, sort_by_depth(idx, num_depths), scale=0.5)
    want = torch_ops.gather_matmul_ref(inp.float(), weight.float(), idx, scale=0.5)
    assert got.dtype == dtype
    assert_close_rel(got, want, FP32_TOL if dtype == torch.float32 else BF16_TOL, "gather_matmul")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["mixed", "unused"])
@pytest.mark.parametrize("shape", ["odd", "real_r16"])
def test_lora_weight_grad(shape, pattern, dtype):
    num_tokens, k, n, _, num_depths = SHAPES[shape]
    left, right = torch.randn(num_tokens, n, dtype=dtype), torch.randn(num_tokens, k, dtype=dtype)
    idx = make_depth_index(pattern, num_tokens, num_depths)
    got = triton_ops.lora_weight_grad(left, right, sort_by_depth(idx, num_depths), scale=2.0)
    want = torch_ops.segment_outer_ref(left.float(), right.float(), idx, num_depths, scale=2.0)
    assert got.shape == (num_depths, n, k) and got.dtype == dtype
    assert_close_rel(got, want, FP32_TOL if dtype == torch.float32 else BF16_TOL, "lora_weight_grad")


def test_launchers_check_their_operands():
    seg = sort_by_depth(torch.tensor([0, 1, 0, 1]), num_depths=2)
    x, w = torch.randn(4, 32), torch.randn(2, 16, 32)
    with pytest.raises(ValueError, match="contiguous rows"):
        triton_ops.gather_matmul(torch.randn(32, 4).T, w, seg)
    with pytest.raises(TypeError, match="weight must be torch.float32"):
        triton_ops.gather_matmul(x, w.to(torch.bfloat16), seg)
    with pytest.raises(ValueError, match=r"does not match input \(T, K\)"):
        triton_ops.gather_matmul(x, torch.randn(2, 16, 31), seg)
    with pytest.raises(ValueError, match="segments cover 4 tokens and 2 depths"):
        triton_ops.gather_matmul(x, torch.randn(3, 16, 32), seg)
    with pytest.raises(ValueError, match="same tokens"):
        triton_ops.lora_weight_grad(x, torch.randn(5, 16), seg)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("strategy", list(torch_ops.TORCH_STRATEGIES))
def test_torch_strategies_match_reference(strategy, pattern):
    num_tokens, d_in, d_out, rank, num_depths = SHAPES["odd"]
    tensors = make_lora(num_tokens, d_in, d_out, rank, num_depths)
    idx = make_depth_index(pattern, num_tokens, num_depths)
    grad_out = torch.randn(num_tokens, d_out)
    fn = torch_ops.TORCH_STRATEGIES[strategy]
    got = forward_backward(lambda x, a, b: fn(x, a, b, idx, 0.5), tensors, grad_out)
    want = forward_backward(lambda x, a, b: torch_ops.multi_lora_reference(x, a, b, idx, 0.5), tensors, grad_out)
    for name, g, w in zip(("y", "grad_x", "grad_A", "grad_B"), got, want):
        assert_close_rel(g, w, FP32_TOL, f"{strategy} {name}")
