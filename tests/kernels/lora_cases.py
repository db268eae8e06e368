"""Shared shapes, depth-index patterns and tolerances for the multi-LoRA kernel tests."""

from __future__ import annotations

import torch

# name -> (T, d_in, d_out, r, D)
SHAPES = {
    "pow2": (32, 64, 128, 16, 4),
    "odd": (42, 123, 431, 8, 3),
    "real_r16": (64, 256, 256, 16, 4),
    "real_r64": (40, 256, 320, 64, 4),
}

# Depth-index patterns of a serving batch; "unused" leaves every depth but the first and last empty;
# "grouped" is mixed but ordered by depth, as the serving engine orders its rows (the CPU strategy's
# slice path, kernels/segments.depth_runs).
PATTERNS = ("mixed", "unused", "one_depth", "all_padding", "grouped")

FP32_TOL = 1e-4  # max abs error relative to the reference's max abs
BF16_TOL = 2e-2


def make_depth_index(pattern: str, num_tokens: int, num_depths: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    if pattern == "mixed":
        idx = torch.randint(-1, num_depths, (num_tokens,))
    elif pattern == "unused":
        choices = torch.tensor([-1, 0, num_depths - 1])
        idx = choices[torch.randint(0, 3, (num_tokens,))]
    elif pattern == "one_depth":
        idx = torch.full((num_tokens,), num_depths // 2)
    elif pattern == "all_padding":
        idx = torch.full((num_tokens,), -1)
    elif pattern == "grouped":
        idx = torch.sort(torch.randint(-1, num_depths, (num_tokens,))).values
    else:
        raise ValueError(pattern)
    return idx.to(dtype)


def make_lora(num_tokens, d_in, d_out, rank, num_depths, dtype=torch.float32, device="cpu"):
    """x (T, d_in), A (D, r, d_in), B (D, d_out, r), scaled so outputs are O(1); all require grad."""
    x = torch.randn(num_tokens, d_in, device=device)
    a = torch.randn(num_depths, rank, d_in, device=device) / d_in**0.5
    b = torch.randn(num_depths, d_out, rank, device=device) / rank**0.5
    return [t.to(dtype).requires_grad_() for t in (x, a, b)]


def forward_backward(fn, tensors, grad_out):
    """Runs y = fn(*tensors), backpropagates grad_out; returns [y, grad of each tensor] (fp32, detached)."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*tensors)
    y.backward(grad_out.to(y.dtype))
    return [y.detach().float()] + [t.grad.float() if t.grad is not None else None for t in tensors]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected|; exact when expected is all zero."""
    assert actual is not None, f"{what}: no gradient"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err = (actual.float() - expected.float()).abs().max().item()
    ref = expected.float().abs().max().item()
    assert err <= tol * ref, f"{what}: max abs error {err:.3g} > {tol} x max abs {ref:.3g}"
