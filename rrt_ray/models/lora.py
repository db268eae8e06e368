"""The relaxed LoRA linear layer: one shared weight, one low-rank correction per loop depth.

    h = x W'^T + bias_b + scale * (x A_b^T) B_b^T          b = the depth of the unrolled position

W' is shared by every depth (and trained). (A_b, B_b) is depth b's LoRA, initialised by truncated
SVD of the residual W_l - W' (B = U_r S_r / scale, A = V_r^T), so that at full rank the layer is
exactly the original layer l. Biases are per depth by default (they are tiny, and keeping them
makes full rank exact); `share_bias=True` keeps one, as in the paper's ablations.

The depth is state set by the caller before each call (`layer.depth = b`), because the Hugging Face
decoder layer that owns this module has no argument to pass it through. It is a python int when all
tokens share a depth (training, plain generation) or an integer tensor shaped like x without its
last dimension (continuous depth-wise batching: every token at its own depth). Both go through
`rrt_ray.kernels.multi_lora`, which takes the two-matmul fast path for an int.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rrt_ray.kernels import multi_lora

Depth = int | torch.Tensor


class RelaxedLoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_depths: int,
        rank: int,
        *,
        bias: bool,
        share_bias: bool = False,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        max_rank = min(in_features, out_features)
        if not 0 <= rank <= max_rank:
            raise ValueError(f"LoRA rank {rank} is outside 0..{max_rank} (min of in={in_features}, out={out_features})")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.num_depths, self.rank, self.scale = num_depths, rank, scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))  # W': (d_out, d_in)
        if bias:
            shape = (out_features,) if share_bias else (num_depths, out_features)
            self.bias = nn.Parameter(torch.zeros(shape, **factory))
        else:
            self.register_parameter("bias", None)
        if rank > 0:
            self.lora_a = nn.Parameter(torch.empty(num_depths, rank, in_features, **factory))  # (D, r, d_in)
            self.lora_b = nn.Parameter(torch.zeros(num_depths, out_features, rank, **factory))  # (D, d_out, r)
        else:
            self.register_parameter("lora_a", None)
            self.register_parameter("lora_b", None)
        self.depth: Depth = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init for W', the usual LoRA init (A random, B zero) so that BA starts at 0."""
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.rank > 0:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        depth = self.depth
        y = F.linear(x, self.weight)  # (..., d_out)
        if self.bias is not None:
            if self.bias.dim() == 1:
                y = y + self.bias
            elif isinstance(depth, int):
                y = y + self.bias[depth]
            else:
                y = y + self.bias[depth.clamp_min(0)]  # (..., d_out); depth -1 only appears for padding
        if self.rank > 0:
            flat_depth = depth if isinstance(depth, int) else depth.reshape(-1)
            delta = multi_lora(x.reshape(-1, self.in_features), self.lora_a, self.lora_b, flat_depth, self.scale)
            y = y + delta.view(y.shape)
        return y

    @torch.no_grad()
    def merged_weight(self, depth: int) -> torch.Tensor:
        """W' + scale * B_b A_b: the dense weight this layer applies at one depth."""
        w = self.weight.clone()
        if self.rank > 0:
            w += self.scale * self.lora_b[depth] @ self.lora_a[depth]
        return w

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, depths={self.num_depths}, rank={self.rank}, "
            f"bias={'none' if self.bias is None else ('shared' if self.bias.dim() == 1 else 'per-depth')}"
        )
