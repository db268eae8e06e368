"""PerDepth with a per-token depth (continuous depth-wise batching): each row gets its own depth's copy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rrt_ray.models.per_depth import PerDepth

NUM_DEPTHS, HIDDEN = 3, 16


def _wrapped(norm: nn.Module) -> tuple[PerDepth, list[nn.Module]]:
    """The PerDepth module with a different weight at every depth, and one plain copy of the norm per depth
    holding that depth's weights: the reference, which never runs PerDepth code."""
    plain = copy.deepcopy(norm)
    module = PerDepth(norm, NUM_DEPTHS)
    references = []
    with torch.no_grad():
        for name in module.param_names:
            getattr(module, name).normal_()
        for d in range(NUM_DEPTHS):
            ref = copy.deepcopy(plain)
            for name in module.param_names:
                getattr(ref, name).copy_(getattr(module, name)[d])
            references.append(ref)
    return module, references


def _row_by_row(references: list[nn.Module], x: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """The definition: every token through the plain norm of its own depth (-1 computes at 0)."""
    out = torch.empty_like(x)
    for t in range(depth.shape[1]):
        out[:, t] = references[max(int(depth[0, t]), 0)](x[:, t : t + 1])[:, 0]
    return out


def _norm(kind: str) -> nn.Module:
    return {"rms": LlamaRMSNorm(HIDDEN), "layernorm": nn.LayerNorm(HIDDEN), "per_head": LlamaRMSNorm(4)}[kind]


@pytest.mark.parametrize("norm", ["rms", "layernorm", "per_head"])
@pytest.mark.parametrize("order", ["grouped", "interleaved", "one_depth"])
def test_per_token_depth_matches_row_by_row(norm, order):
    torch.manual_seed(0)
    module, references = _wrapped(_norm(norm))
    # per_head: a Qwen3-style q/k norm on (1, T, heads, head_dim); depth still covers (1, T)
    x = torch.randn(1, 9, HIDDEN) if norm != "per_head" else torch.randn(1, 9, 4, 4)
    depth = {
        "grouped": torch.tensor([[-1, 0, 0, 0, 1, 1, 2, 2, 2]]),  # the engine's order: slices
        "interleaved": torch.tensor([[2, 0, 1, 0, 2, -1, 1, 0, 2]]),  # masks
        "one_depth": torch.full((1, 9), 1),
    }[order]
    want = _row_by_row(references, x, depth)
    module.depth = depth
    got = module(x)
    # Same ops on the same rows, only batched differently: fp32 rounding of the mean, nothing more.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["rms", "layernorm"])
def test_int_depth_is_the_plain_norm_with_that_depths_weights(norm):
    torch.manual_seed(1)
    module, references = _wrapped(_norm(norm))
    x = torch.randn(2, 5, HIDDEN)
    for d in range(NUM_DEPTHS):
        module.depth = d
        torch.testing.assert_close(module(x), references[d](x), rtol=0, atol=0)
