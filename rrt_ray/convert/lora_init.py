"""How each depth's LoRA starts, as a registry (LORA_INITS).

    svd   truncated SVD of the residual W_l - W': B = U_r S_r / scale, A = V_r^T, so that
          W' + scale * B A is the best rank-r approximation of W_l (exact at full rank)
    zero  the usual LoRA start: B = 0 (so B A = 0) with a random A, so that B gets gradients

A strategy takes a `LoRAInitInput` (one projection at one unrolled position) and returns (A, B).
New inputs (calibration statistics, say) are new fields of `LoRAInitInput` with a default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rrt_ray.convert.svd import truncated_svd
from rrt_ray.registry import Registry


@dataclass(frozen=True)
class LoRAInitInput:
    original: Callable[[], torch.Tensor]  # -> W_l (d_out, d_in), the original layer's weight (read on demand)
    shared: torch.Tensor  # W'_k (d_out, d_in)
    rank: int  # r >= 1
    scale: float  # h = W'x + scale * B A x
    seed: int  # deterministic per (shared layer, depth)
    moment: torch.Tensor | None = None  # C (d_in, d_in): second moment of the layer's inputs (--calibrate)
    damping: float = 0.01  # of C's mean diagonal, for the Cholesky factor of C


LoRAInit = Callable[[LoRAInitInput], tuple[torch.Tensor, torch.Tensor]]  # -> A (r, d_in), B (d_out, r)
LORA_INITS: Registry[LoRAInit] = Registry("lora init")


@LORA_INITS.register("svd")
def svd_init(spec: LoRAInitInput) -> tuple[torch.Tensor, torch.Tensor]:
    """With calibration statistics, the activation-aware truncation (rrt_ray/convert/calibrate.py)."""
    residual = spec.original() - spec.shared  # (d_out, d_in)
    if spec.moment is not None:
        from rrt_ray.convert.calibrate import whitened_truncated_svd

        us, vh = whitened_truncated_svd(residual, spec.moment, spec.rank, damping=spec.damping, seed=spec.seed)
    else:
        us, vh = truncated_svd(residual, spec.rank, seed=spec.seed)  # (d_out, r), (r, d_in)
    return vh, us / spec.scale


@LORA_INITS.register("zero")
def zero_init(spec: LoRAInitInput) -> tuple[torch.Tensor, torch.Tensor]:
    out_features, in_features = spec.shared.shape
    a = torch.empty(spec.rank, in_features)
    torch.nn.init.kaiming_uniform_(a, a=5**0.5, generator=torch.Generator().manual_seed(spec.seed))
    return a, torch.zeros(out_features, spec.rank)
