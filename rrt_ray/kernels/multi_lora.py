"""Multi-LoRA with a per-token loop depth: checks, autograd, backend choice, the public functions.

    y_t = scale * B[i_t] @ (A[i_t] @ x_t)      x (T, d_in), A (D, r, d_in), B (D, d_out, r)

`depth_index` is a python int when every token is at one depth (training, plain generation): two
plain matmuls, no index work. It is an int tensor (T,) under continuous depth-wise batching, with
-1 for padding tokens (output row 0). Backends:

    "auto"       Triton on CUDA tensors, the measured-best torch strategy elsewhere (default)
    "triton"     the kernels of triton_ops; on CPU only under TRITON_INTERPRET=1 (tests)
    "torch"      torch_ops.TORCH_STRATEGIES[DEFAULT_TORCH_STRATEGY]
    "reference"  torch_ops.multi_lora_reference, the readable definition

The RRT_LORA_BACKEND environment variable sets the default when `backend` is None.
"""

from __future__ import annotations

import importlib.util
import numbers
import os
from collections.abc import Sequence

import torch

from rrt_ray.kernels import torch_ops
from rrt_ray.kernels.segments import FLOAT_DTYPES, DepthSegments, TensorMemo, sort_by_depth

BACKENDS = ("auto", "triton", "torch", "reference")
BACKEND_ENV = "RRT_LORA_BACKEND"
INDEX_DTYPES = (torch.int32, torch.int64)

DepthIndex = int | torch.Tensor
LoRAPair = tuple[torch.Tensor, torch.Tensor]


def _triton_ops():
    """Imported on first use: @triton.jit decides when the module is imported whether its kernels are
    interpreted (TRITON_INTERPRET), so importing it as a side effect of `import rrt_ray` would fix that
    choice before a test or script had a chance to set the variable."""
    from rrt_ray.kernels import triton_ops

    return triton_ops


class _LoraShrink(torch.autograd.Function):
    """h = shrink(x, A):  h_t = A[i_t] x_t  (T, r), and h_t = 0 where i_t = -1.

    Backward, given dh = dL/dh (T, r):
        dL/dx_t = A[i_t]^T dh_t                  gather_matmul(dh, A^T): the expand kernel with A
                                                 passed transposed (a strided view, no copy)
        dL/dA_d = sum_{t: i_t = d} dh_t x_t^T    lora_weight_grad(dh, x), a reduction per depth segment
    A token at depth -1 uses no A: its dx row is 0 and it adds to no dA_d. A depth that no token
    uses gets dA_d = 0.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, segments: DepthSegments) -> torch.Tensor:
        ctx.save_for_backward(x, lora_a)
        ctx.segments = segments
        return _triton_ops().lora_shrink(x, lora_a, segments)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        x, lora_a = ctx.saved_tensors
        ops, grad_h = _triton_ops(), grad_h.contiguous()
        grad_x = ops.gather_matmul(grad_h, lora_a.transpose(1, 2), ctx.segments) if ctx.needs_input_grad[0] else None
        grad_a = ops.lora_weight_grad(grad_h, x, ctx.segments) if ctx.needs_input_grad[1] else None
        return grad_x, grad_a, None


class _LoraExpand(torch.autograd.Function):
    """y = expand(h, B, s):  y_t = s B[i_t] h_t  (T, d_out), and y_t = 0 where i_t = -1.

    Backward, given dy = dL/dy (T, d_out):
        dL/dh_t = s B[i_t]^T dy_t                gather_matmul(dy, B^T, s): the shrink kernel with B
                                                 passed transposed
        dL/dB_d = s sum_{t: i_t = d} dy_t h_t^T  lora_weight_grad(dy, h, s)
    Chained with _LoraShrink this gives dx_t = s A^T B^T dy_t and dA_d = s sum B_d^T dy_t x_t^T,
    the gradients of y_t = s B A x_t. Depth -1 rows and unused depths get 0 as above.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, lora_b: torch.Tensor, segments: DepthSegments, scale: float) -> torch.Tensor:
        ctx.save_for_backward(h, lora_b)
        ctx.segments, ctx.scale = segments, scale
        return _triton_ops().lora_expand(h, lora_b, segments, scale)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        h, lora_b = ctx.saved_tensors
        ops, grad_y = _triton_ops(), grad_y.contiguous()
        s, segs = ctx.scale, ctx.segments
        grad_h = ops.gather_matmul(grad_y, lora_b.transpose(1, 2), segs, s) if ctx.needs_input_grad[0] else None
        grad_b = ops.lora_weight_grad(grad_y, h, segs, s) if ctx.needs_input_grad[1] else None
        return grad_h, grad_b, None, None


# ---------------------------------------------------------------------------------------------------
# Input checks: every mistake a caller can make raises here, naming the value and what is allowed.


def _check_lora(x: torch.Tensor, lora_a: object, lora_b: object, name_a: str, name_b: str) -> int:
    """Checks one (A, B) pair against x; returns its number of depths D."""
    for name, t in ((name_a, lora_a), (name_b, lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D, got shape {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            want, got = f"{x.dtype} on {x.device}", f"{t.dtype} on {t.device}"
            raise TypeError(f"{name} must have x's dtype and device, {want}; got {got}")
    if lora_a.shape[0] == 0:
        raise ValueError(f"{name_a} has 0 depths, shape (D, r, d_in) = {tuple(lora_a.shape)}: at least 1 is needed")
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(
            f"{name_a} (D, r, d_in) = {tuple(lora_a.shape)} does not match x (T, d_in) = {tuple(x.shape)}: "
            f"d_in {lora_a.shape[2]} != {x.shape[1]}"
        )
    if lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(
            f"{name_b} (D, d_out, r) = {tuple(lora_b.shape)} does not match {name_a} (D, r, d_in) = "
            f"{tuple(lora_a.shape)}: rank {lora_b.shape[2]} != {lora_a.shape[1]}"
        )
    if lora_b.shape[0] != lora_a.shape[0]:
        raise ValueError(
            f"{name_a} has {lora_a.shape[0]} depths and {name_b} has {lora_b.shape[0]}: they must be equal"
        )
    return lora_a.shape[0]


def _check_depth_index(depth_index: object, num_tokens: int, num_depths: int, device: torch.device) -> None:
    """An int in [-1, D), or an int32/int64 tensor (T,) on x's device with values in [-1, D)."""
    if isinstance(depth_index, bool) or not isinstance(depth_index, (numbers.Integral, torch.Tensor)):
        raise TypeError(f"depth_index must be an int or an int32/int64 tensor, got {type(depth_index).__name__}")
    if isinstance(depth_index, numbers.Integral):
        if not -1 <= depth_index < num_depths:
            raise ValueError(f"depth_index {depth_index} is out of range: allowed -1 (no LoRA) .. {num_depths - 1}")
        return
    if depth_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"depth_index tensor must be int32 or int64, got {depth_index.dtype}")
    if depth_index.dim() != 1 or depth_index.shape[0] != num_tokens:
        raise ValueError(f"depth_index must have shape ({num_tokens},) like x's tokens, got {tuple(depth_index.shape)}")
    if depth_index.device != device:
        raise ValueError(f"depth_index is on {depth_index.device}, x on {device}: they must be on one device")
    if num_tokens and not _range_checked.get(depth_index, num_depths):
        # One host sync on CUDA: a wrong index would otherwise read another depth's weights silently.
        lo, hi = (int(v) for v in torch.aminmax(depth_index))
        if lo < -1 or hi >= num_depths:
            bad = lo if lo < -1 else hi
            raise ValueError(f"depth_index holds {bad}: allowed -1 (no LoRA) .. {num_depths - 1}")
        _range_checked.put(depth_index, True, num_depths)


# The last depth index that passed the range check, per thread: one serving step sends the same index
# through every LoRA projection of every layer, so checking it once saves all but one host sync per step.
_range_checked = TensorMemo()


def _check_inputs(x: object, loras: Sequence[LoRAPair], depth_index: object, scale: object, single: bool) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (tokens, d_in), got shape {tuple(x.shape)}; flatten leading dims first")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a python float, got {type(scale).__name__}")
    if not isinstance(loras, Sequence) or len(loras) == 0:
        raise ValueError(f"loras must be a non-empty list of (lora_a, lora_b) pairs, got {loras!r}")
    depths = set()
    for p, pair in enumerate(loras):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"loras[{p}] must be an (lora_a, lora_b) pair, got {type(pair).__name__}")
        names = ("lora_a", "lora_b") if single else (f"loras[{p}][0] (A)", f"loras[{p}][1] (B)")
        depths.add(_check_lora(x, pair[0], pair[1], *names))
    if len(depths) > 1:
        raise ValueError(f"all projections must have the same number of depths, got {sorted(depths)}")
    num_depths = depths.pop()
    _check_depth_index(depth_index, x.shape[0], num_depths, x.device)
    return num_depths


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that will run on `device`: one of "triton", "torch", "reference"."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV, "auto") or "auto", BACKEND_ENV
    if backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not a multi-LoRA backend: allowed {', '.join(BACKENDS)}")
    if backend == "auto":
        use_triton = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        return "triton" if use_triton else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{source}='triton' needs CUDA tensors, got {device}; on CPU it runs only in Triton's interpreter "
            "(set TRITON_INTERPRET=1 before triton is imported)"
        )
    return backend


# ---------------------------------------------------------------------------------------------------
# Public functions.


def multi_lora_fused(
    x: torch.Tensor,  # (T, d_in)
    loras: Sequence[LoRAPair],  # [(A_p (D, r_p, d_in), B_p (D, d_out_p, r_p)), ...], ranks may differ
    depth_index: DepthIndex,  # int, or (T,) int32/int64 in [-1, D)
    scale: float,
    backend: str | None = None,
) -> list[torch.Tensor]:  # [(T, d_out_p), ...]
    """Several LoRA projections of one input (q/k/v, gate/up). The Triton path shrinks once over the
    A's concatenated along r, then expands each projection from its slice of h."""
    return _multi_lora(x, loras, depth_index, scale, backend, single=False)


def multi_lora(
    x: torch.Tensor,  # (T, d_in)
    lora_a: torch.Tensor,  # (D, r, d_in)
    lora_b: torch.Tensor,  # (D, d_out, r)
    depth_index: DepthIndex,  # int, or (T,) int32/int64 in [-1, D)
    scale: float,
    backend: str | None = None,
) -> torch.Tensor:  # (T, d_out), x's dtype
    """y_t = scale * B[i_t] @ (A[i_t] @ x_t), 0 where i_t = -1. Differentiable in x, A and B."""
    return _multi_lora(x, [(lora_a, lora_b)], depth_index, scale, backend, single=True)[0]


def _multi_lora(
    x: torch.Tensor,
    loras: Sequence[LoRAPair],
    depth_index: DepthIndex,
    scale: float,
    backend: str | None,
    single: bool,
) -> list[torch.Tensor]:
    num_depths = _check_inputs(x, loras, depth_index, scale, single)
    backend = resolve_backend(backend, x.device)
    scale = float(scale)
    if isinstance(depth_index, numbers.Integral):
        if depth_index >= 0:  # every token at one depth: plain matmuls, whatever the backend
            d = int(depth_index)
            return [((x @ a[d].T) * scale) @ b[d].T for a, b in loras]
        # No LoRA for anyone: rare, so take the tensor path, which keeps zero grads (not None).
        depth_index = torch.full((x.shape[0],), -1, dtype=torch.int32, device=x.device)
    if backend == "reference":
        return [torch_ops.multi_lora_reference(x, a, b, depth_index, scale) for a, b in loras]
    if backend == "torch":
        strategy = torch_ops.TORCH_STRATEGIES[torch_ops.DEFAULT_TORCH_STRATEGY]
        return [strategy(x, a, b, depth_index, scale) for a, b in loras]
    segments = sort_by_depth(depth_index, num_depths)
    x = x if x.stride(-1) == 1 else x.contiguous()
    lora_a = loras[0][0] if len(loras) == 1 else torch.cat([a for a, _ in loras], dim=1)  # (D, sum r, d_in)
    h = _LoraShrink.apply(x, lora_a, segments)  # (T, sum r)
    outs, start = [], 0
    for a, b in loras:
        rank = a.shape[1]
        outs.append(_LoraExpand.apply(h[:, start : start + rank], b, segments, scale))  # (T, d_out_p)
        start += rank
    return outs
