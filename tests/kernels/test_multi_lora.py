"""multi_lora / multi_lora_fused: every backend against the reference, forward and all three gradients.

The Triton backend runs in Triton's interpreter here (tests/conftest.py sets TRITON_INTERPRET=1).
"""

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

from rrt_ray.kernels import multi_lora, multi_lora_fused, resolve_backend
from rrt_ray.kernels.torch_ops import multi_lora_reference

SCALE = 0.5
FAST_BACKENDS = ("triton", "torch")


def _check_against_reference(backend, tensors, idx, grad_out, tol):
    got = forward_backward(lambda x, a, b: multi_lora(x, a, b, idx, SCALE, backend=backend), tensors, grad_out)
    want = forward_backward(
        lambda x, a, b: multi_lora_reference(x, a, b, idx, SCALE), [t.float() for t in tensors], grad_out
    )
    for name, g, w in zip(("y", "grad_x", "grad_A", "grad_B"), got, want):
        assert_close_rel(g, w, tol, f"{backend} {name}")
    return got


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference_fp32(backend, pattern, shape):
    num_tokens, d_in, d_out, rank, num_depths = SHAPES[shape]
    tensors = make_lora(num_tokens, d_in, d_out, rank, num_depths)
    idx = make_depth_index(pattern, num_tokens, num_depths)
    grad_out = torch.randn(num_tokens, d_out)
    y, grad_x, grad_a, grad_b = _check_against_reference(backend, tensors, idx, grad_out, FP32_TOL)
    # Padding rows and unused depths get exact zeros, not just small numbers.
    assert torch.all(y[idx == -1] == 0) and torch.all(grad_x[idx == -1] == 0)
    unused = [d for d in range(num_depths) if not torch.any(idx == d)]
    assert torch.all(grad_a[unused] == 0) and torch.all(grad_b[unused] == 0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", ["odd", "real_r64"])
def test_bf16_matches_fp32_reference(backend, shape):
    num_tokens, d_in, d_out, rank, num_depths = SHAPES[shape]
    tensors = make_lora(num_tokens, d_in, d_out, rank, num_depths, dtype=torch.bfloat16)
    idx = make_depth_index("mixed", num_tokens, num_depths)
    y = _check_against_reference(backend, tensors, idx, torch.randn(num_tokens, d_out), BF16_TOL)[0]
    assert multi_lora(*tensors, idx, SCALE, backend=backend).dtype == torch.bfloat16
    assert y.abs().max() > 0


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_dtypes(index_dtype):
    tensors = make_lora(*SHAPES["pow2"])
    idx = make_depth_index("mixed", SHAPES["pow2"][0], SHAPES["pow2"][4], index_dtype)
    _check_against_reference("triton", tensors, idx, torch.randn(SHAPES["pow2"][0], SHAPES["pow2"][2]), FP32_TOL)


# An int depth >= 0 takes the plain-matmul path whatever the backend, so it is tested once; depth -1
# goes through each backend's tensor path.
@pytest.mark.parametrize("backend, depth", [(None, 0), (None, 2)] + [(b, -1) for b in ("auto", "triton", "torch", "reference")])
def test_int_depth_is_the_same_depth_for_every_token(backend, depth):
    num_tokens, d_in, d_out, rank, num_depths = SHAPES["odd"]
    tensors = make_lora(num_tokens, d_in, d_out, rank, num_depths)
    grad_out = torch.randn(num_tokens, d_out)
    got = forward_backward(lambda x, a, b: multi_lora(x, a, b, depth, SCALE, backend=backend), tensors, grad_out)
    full = torch.full((num_tokens,), depth)
    want = forward_backward(lambda x, a, b: multi_lora_reference(x, a, b, full, SCALE), tensors, grad_out)
    for name, g, w in zip(("y", "grad_x", "grad_A", "grad_B"), got, want):
        assert_close_rel(g, w, FP32_TOL, f"{name} at depth {depth}")


@pytest.mark.parametrize("backend, depth", [(b, "tensor") for b in ("triton", "torch", "reference")] + [(None, "int")])
def test_zero_tokens(backend, depth):
    x, a, b = make_lora(0, 16, 24, 16, 3)
    idx = torch.zeros(0, dtype=torch.int64) if depth == "tensor" else 1
    y = multi_lora(x, a, b, idx, SCALE, backend=backend)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.all(a.grad == 0) and torch.all(b.grad == 0)


def test_gpu_tile_sizes_under_the_interpreter(monkeypatch):
    """The launchers use small GPU tiles off the interpreter: run those tiles here too (many programs)."""
    from rrt_ray.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_interpreting", lambda: False)
    num_tokens, d_in, d_out, rank, num_depths = SHAPES["odd"]
    tensors = make_lora(num_tokens, d_in, d_out, rank, num_depths)
    idx = make_depth_index("mixed", num_tokens, num_depths)
    _check_against_reference("triton", tensors, idx, torch.randn(num_tokens, d_out), FP32_TOL)


@pytest.mark.parametrize("backend, depth", [("triton", "mixed"), ("torch", "mixed"), (None, "int")])
def test_fused_matches_separate_calls(backend, depth):
    num_tokens, d_in, num_depths = 42, 123, 3
    ranks, d_outs = (16, 8, 24), (64, 40, 72)  # q, k, v with different ranks and widths
    x = torch.randn(num_tokens, d_in, requires_grad=True)
    pairs = [
        (
            (torch.randn(num_depths, r, d_in) / d_in**0.5).requires_grad_(),
            (torch.randn(num_depths, o, r) / r**0.5).requires_grad_(),
        )
        for r, o in zip(ranks, d_outs)
    ]
    idx = make_depth_index("mixed", num_tokens, num_depths) if depth == "mixed" else 1
    grads_out = [torch.randn(num_tokens, o) for o in d_outs]
    params = [x] + [t for pair in pairs for t in pair]

    def run(fused: bool):
        for p in params:
            p.grad = None
        if fused:
            ys = multi_lora_fused(x, pairs, idx, SCALE, backend=backend)
        else:
            full = idx if isinstance(idx, torch.Tensor) else torch.full((num_tokens,), idx)  # never the int fast path
            ys = [multi_lora_reference(x, a, b, full, SCALE) for a, b in pairs]
        torch.autograd.backward(ys, grads_out)
        return [y.detach() for y in ys] + [p.grad.clone() for p in params]

    got, want = run(fused=True), run(fused=False)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_rel(g, w, FP32_TOL, f"fused output/grad #{i}")


def test_default_backend_from_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("RRT_LORA_BACKEND", raising=False)
    assert resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv("RRT_LORA_BACKEND", "reference")
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend("triton", cpu) == "triton"  # an explicit backend wins over the variable
    monkeypatch.setenv("RRT_LORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RRT_LORA_BACKEND='cuda'.*allowed auto, triton, torch, reference"):
        multi_lora(*make_lora(4, 16, 16, 16, 2), 0, SCALE)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        multi_lora(*make_lora(4, 16, 16, 16, 2), torch.zeros(4, dtype=torch.int64), SCALE, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_reference(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    num_tokens, d_in, d_out, rank, num_depths = 200, 2048, 2048, 64, 4
    tensors = make_lora(num_tokens, d_in, d_out, rank, num_depths, dtype=dtype, device="cuda")
    idx = make_depth_index("mixed", num_tokens, num_depths).cuda()
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert resolve_backend(None, idx.device) == "triton"
    _check_against_reference(None, tensors, idx, torch.randn(num_tokens, d_out, device="cuda"), tol)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("inference", [False, True])
def test_a_depth_index_written_in_place_is_never_served_from_a_stale_cache(backend, inference):
    """The range check and the CPU depth runs are remembered per tensor; under torch.inference_mode a tensor
    has no version counter, so an in-place write must still be seen (and a bad value still refused)."""
    num_tokens, d_in, d_out, rank, num_depths = 12, 16, 24, 16, 3
    x, a, b = (t.detach() for t in make_lora(num_tokens, d_in, d_out, rank, num_depths))
    context = torch.inference_mode() if inference else torch.no_grad()
    with context:
        idx = torch.tensor([0] * 6 + [1] * 6)
        for new in ([2] * 4 + [0] * 8, [1, 0] * 6):
            got = multi_lora(x, a, b, idx, SCALE, backend=backend)
            assert_close_rel(got, multi_lora_reference(x, a, b, idx.clone(), SCALE), FP32_TOL, f"before {new}")
            idx.copy_(torch.tensor(new))  # same memory, new contents
            got = multi_lora(x, a, b, idx, SCALE, backend=backend)
            assert_close_rel(got, multi_lora_reference(x, a, b, idx.clone(), SCALE), FP32_TOL, f"after {new}")
        idx[3] = num_depths  # out of range: the check must run again
        with pytest.raises(ValueError, match="depth_index holds 3"):
            multi_lora(x, a, b, idx, SCALE, backend=backend)
