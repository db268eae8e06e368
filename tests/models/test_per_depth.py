"""PerDepth with a per-token depth (continuous depth-wise batching): each row gets its own depth's copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rrt_ray.models.per_depth import PerDepth

NUM_DEPTHS, HIDDEN = 3, 16


def _wrapped(norm: nn.Module) -> PerDepth:
    module = PerDepth(norm, NUM_DEPTHS)
    with torch.no_grad():
        for name in module.param_names:  # a different weight at every depth
            getattr(module, name).normal_()
    return module


def _row_by_row(module: PerDepth, x: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """The definition: every token through the int-depth path of its own depth (-1 computes at 0)."""
    out = torch.empty_like(x)
    for t in range(depth.shape[1]):
        module.depth = max(int(depth[0, t]), 0)
        out[:, t] = module(x[:, t : t + 1])[:, 0]
    return out


@pytest.mark.parametrize("norm", ["rms", "layernorm", "per_head"])
@pytest.mark.parametrize("order", ["grouped", "interleaved", "one_depth"])
def test_per_token_depth_matches_row_by_row(norm, order):
    torch.manual_seed(0)
    inner = {"rms": LlamaRMSNorm(HIDDEN), "layernorm": nn.LayerNorm(HIDDEN), "per_head": LlamaRMSNorm(4)}[norm]
    module = _wrapped(inner)
    # per_head: a Qwen3-style q/k norm on (1, T, heads, head_dim); depth still covers (1, T)
    x = torch.randn(1, 9, HIDDEN) if norm != "per_head" else torch.randn(1, 9, 4, 4)
    depth = {
        "grouped": torch.tensor([[-1, 0, 0, 0, 1, 1, 2, 2, 2]]),  # the engine's order: slices
        "interleaved": torch.tensor([[2, 0, 1, 0, 2, -1, 1, 0, 2]]),  # masks
        "one_depth": torch.full((1, 9), 1),
    }[order]
    want = _row_by_row(module, x, depth)
    module.depth = depth
    got = module(x)
    # Same ops on the same rows, only batched differently: fp32 rounding of the mean, nothing more.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
