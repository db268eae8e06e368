"""PerDepth: one copy of a small module's parameters per loop depth (norm weights, per-head norms).

A shared decoder layer runs B times; its norms are tiny next to its matrices, so by default every
depth keeps its own copy (initialised from the original layer at that depth), which keeps the
conversion exact at full LoRA rank. The wrapped module's own parameters are removed and replaced,
for each call, by the slice of the stacked parameter for the current depth (`torch.func.
functional_call`), so any norm class works unchanged: RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm
with bias, Qwen3's per-head q/k norms.

Parameter `input_layernorm.weight` of shape (H,) becomes `input_layernorm.weight` of shape (B, H).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from rrt_ray.kernels.segments import depth_runs

Depth = int | torch.Tensor


class PerDepth(nn.Module):
    def __init__(self, module: nn.Module, num_depths: int) -> None:
        super().__init__()
        if any(True for _ in module.children()):
            raise ValueError(f"PerDepth wraps leaf modules only, got {type(module).__name__} with children")
        self.num_depths = num_depths
        self.param_names = [name for name, _ in module.named_parameters()]
        for name in self.param_names:
            param = module._parameters.pop(name)
            # A placeholder that functional_call overwrites per call: shaped like the original (the norm's
            # repr reads weight.shape; DeepSpeed ZeRO-3 prints the model), on the meta device (no memory).
            setattr(module, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))
            stacked = param.detach().unsqueeze(0).expand(num_depths, *param.shape).clone()  # (B, *shape)
            self.register_parameter(name, nn.Parameter(stacked, requires_grad=param.requires_grad))
        self.inner = module
        self.depth: Depth = 0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        depth = self.depth
        if isinstance(depth, int):
            params = {name: getattr(self, name)[depth] for name in self.param_names}
            return functional_call(self.inner, params, (x, *args), kwargs)
        # Tokens at different depths (continuous depth-wise batching): run each depth's group.
        # depth: a leading part of x.shape, with -1 for padding slots, computed at depth 0 and ignored.
        runs = depth_runs(depth)
        if len(runs) <= self.num_depths + 1:  # grouped by depth (the engine's order): slices, no masks
            flat = x.reshape(depth.numel(), *x.shape[depth.dim():])
            pieces = []
            for d, start, end in runs:
                params = {name: getattr(self, name)[max(d, 0)] for name in self.param_names}
                pieces.append(functional_call(self.inner, params, (flat[start:end], *args), kwargs))
            return torch.cat(pieces).view(x.shape) if pieces else torch.empty_like(x)
        depth = depth.clamp_min(0)
        out = torch.empty_like(x)
        for d in torch.unique(depth).tolist():
            rows = depth == d
            params = {name: getattr(self, name)[d] for name in self.param_names}
            out[rows] = functional_call(self.inner, params, (x[rows], *args), kwargs)
        return out

    def extra_repr(self) -> str:
        return f"depths={self.num_depths}, params={self.param_names}"
