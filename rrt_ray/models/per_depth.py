"""PerDepth: one copy of a small module's parameters per loop depth (norm weights, per-head norms).

A shared decoder layer runs B times; its norms are tiny next to its matrices, so by default every
depth keeps its own copy (initialised from the original layer at that depth), which keeps the
conversion exact at full LoRA rank. The wrapped module's own parameters are removed and replaced,
for each call, by the slice of the stacked parameter for the current depth, so any norm class works
unchanged: RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm with bias, Qwen3's per-head q/k norms.

Parameter `input_layernorm.weight` of shape (H,) becomes `input_layernorm.weight` of shape (B, H).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rrt_ray.kernels.segments import depth_runs

Depth = int | torch.Tensor


class PerDepth(nn.Module):
    def __init__(self, module: nn.Module, num_depths: int) -> None:
        super().__init__()
        if any(True for _ in module.children()):
            raise ValueError(f"PerDepth wraps leaf modules only, got {type(module).__name__} with children")
        self.num_depths = num_depths
        self.param_names = [name for name, _ in module.named_parameters()]
        self._placeholders: dict[str, torch.Tensor] = {}
        for name in self.param_names:
            param = module._parameters.pop(name)
            # A plain attribute that each call points at the current depth's slice, and then back at this
            # placeholder: shaped like the original (the norm's repr reads weight.shape; DeepSpeed ZeRO-3
            # prints the model), on the meta device (no memory).
            self._placeholders[name] = torch.empty(param.shape, dtype=param.dtype, device="meta")
            setattr(module, name, self._placeholders[name])
            stacked = param.detach().unsqueeze(0).expand(num_depths, *param.shape).clone()  # (B, *shape)
            self.register_parameter(name, nn.Parameter(stacked, requires_grad=param.requires_grad))
        self.inner = module
        self.depth: Depth = 0

    def _call_at(self, depth: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The wrapped module with depth `depth`'s parameters (views of the stacked ones, so gradients
        reach them). A direct attribute swap: the wrapped module is a leaf whose parameters are plain
        attributes now, and torch.func.functional_call's generality cost ~20 us a call, as much as the
        norm itself at serving batch sizes."""
        inner_attrs = self.inner.__dict__
        for name in self.param_names:
            inner_attrs[name] = self._parameters[name][depth]
        try:
            return self.inner(x, *args, **kwargs)
        finally:
            inner_attrs.update(self._placeholders)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        depth = self.depth
        if isinstance(depth, int):
            return self._call_at(depth, x, args, kwargs)
        # Tokens at different depths (continuous depth-wise batching): run each depth's group.
        # depth: a leading part of x.shape, with -1 for padding slots, computed at depth 0 and ignored.
        runs = depth_runs(depth)
        if len(runs) <= self.num_depths + 1:  # grouped by depth (the engine's order): slices, no masks
            flat = x.reshape(depth.numel(), *x.shape[depth.dim():])
            pieces = [self._call_at(max(d, 0), flat[start:end], args, kwargs) for d, start, end in runs]
            return torch.cat(pieces).view(x.shape) if pieces else torch.empty_like(x)
        depth = depth.clamp_min(0)
        out = torch.empty_like(x)
        for d in torch.unique(depth).tolist():
            rows = depth == d
            out[rows] = self._call_at(d, x[rows], args, kwargs)
        return out

    def extra_repr(self) -> str:
        return f"depths={self.num_depths}, params={self.param_names}"
