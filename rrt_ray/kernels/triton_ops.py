"""Triton multi-LoRA kernels with a per-token depth index (SGMV, as in Punica / vLLM lora/ops).

Two kernels cover the forward and the whole backward, both over depth segments (`segments.py`):

  `_gather_matmul_kernel`   out[t] = scale * W[i_t] @ in[t]        launchers:
        lora_shrink   h  = x  @ A[i]^T      (T, d_in) x (D, r, d_in)   -> (T, r)
        lora_expand   y  = s * h @ B[i]^T    (T, r)    x (D, d_out, r)  -> (T, d_out)
        and, with the weight passed transposed (a strided view, no copy), the grad-input products
        dh = s * dy @ B[i] and dx = dh @ A[i] of the backward.
  `_segment_outer_kernel`  out[d] = scale * sum_{t: i_t = d} left[t]^T right[t]   launcher:
        lora_weight_grad  dA[d] = sum dh_t x_t^T (D, r, d_in);  dB[d] = s * sum dy_t h_t^T (D, d_out, r)

Shrink and expand are one kernel: they differ only in which of N and K is the small rank, so only
their tile sizes differ (`_tiles`). vLLM keeps them apart for split-K in the shrink and
slice fusion in the expand, neither of which this project needs yet.

Per-depth reductions (dA, dB) are done by sorting rather than atomics: one program owns one
(depth, N-tile, K-tile) block of the weight gradient and loops over that depth's token segment.
That is deterministic (fp32 atomics are not: the summation order changes run to run), needs no
zero-initialised fp32 scratch and cast for bf16 weights, writes exact zeros for unused depths, and
the sort is already paid for by the forward. Its cost is parallelism when one depth holds most
tokens, which split-K over tokens would fix if a profile ever shows it.

Every dot runs on fp32 operands on CPU (the interpreter's bf16 tl.dot is wrong, ../shared/MACHINE.md)
and for fp32 inputs on GPU (IEEE, or TF32 when torch.backends.cuda.matmul.allow_tf32 says so, to
match torch); bf16/fp16 inputs on GPU use the tensor cores with an fp32 accumulator.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rrt_ray.kernels.segments import FLOAT_DTYPES, DepthSegments



@triton.jit
def _gather_matmul_kernel(
    in_ptr, w_ptr, out_ptr, sorted_ids_ptr, seg_start_ptr, seg_len_ptr,
    N, K,
    stride_it, stride_ik, stride_wd, stride_wn, stride_wk, stride_ot, stride_on,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (D, cdiv(T, BLOCK_M), cdiv(N, BLOCK_N)): program (d, m, n) computes out rows of the m-th
    BLOCK_M tokens of depth d's segment, columns n*BLOCK_N...; programs past the segment's end exit."""
    depth = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + depth)
    if pid_m * BLOCK_M >= seg_len:
        return
    seg_start = tl.load(seg_start_ptr + depth)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) positions in the segment
    m_mask = offs_m < seg_len
    tok = tl.load(sorted_ids_ptr + seg_start + offs_m, mask=m_mask, other=0).to(tl.int64)  # (BM,) token ids
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    n_mask = offs_n < N
    in_rows = in_ptr + tok[:, None] * stride_it  # (BM, 1)
    w_cols = w_ptr + depth.to(tl.int64) * stride_wd + offs_n[None, :] * stride_wn  # (1, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_mask = offs_k < K
        a = tl.load(in_rows + offs_k[None, :] * stride_ik, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)  # (BM, BK) @ (BK, BN)
    acc = acc * scale
    out = out_ptr + tok[:, None] * stride_ot + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _segment_outer_kernel(
    left_ptr, right_ptr, out_ptr, sorted_ids_ptr, seg_start_ptr, seg_len_ptr,
    N, K,
    stride_lt, stride_ln, stride_rt, stride_rk, stride_od, stride_on, stride_ok,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (D, cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)): program (d, n, k) sums left^T right over depth
    d's tokens, BLOCK_M at a time, into out[d, n-tile, k-tile]; an empty segment stores zeros."""
    depth = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + depth)
    seg_start = tl.load(seg_start_ptr + depth)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    n_mask = offs_n < N
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, seg_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)  # (BM,)
        m_mask = offs_m < seg_len
        tok = tl.load(sorted_ids_ptr + seg_start + offs_m, mask=m_mask, other=0).to(tl.int64)
        lt = tl.load(  # (BN, BM): left loaded transposed
            left_ptr + tok[None, :] * stride_lt + offs_n[:, None] * stride_ln,
            mask=n_mask[:, None] & m_mask[None, :], other=0.0,
        )  # fmt: skip
        r = tl.load(  # (BM, BK)
            right_ptr + tok[:, None] * stride_rt + offs_k[None, :] * stride_rk,
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )  # fmt: skip
        if DOT_FP32:
            lt = lt.to(tl.float32)
            r = r.to(tl.float32)
        acc += tl.dot(lt, r, input_precision=PRECISION)
    acc = acc * scale
    out = out_ptr + depth.to(tl.int64) * stride_od + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# ---------------------------------------------------------------------------------------------------
# Launchers: check what the kernels assume, pick tiles, launch.


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_config(dtype: torch.dtype, device: torch.device) -> tuple[bool, str | None]:
    """(DOT_FP32, PRECISION) for the kernels; see the module docstring."""
    if device.type != "cuda" or dtype == torch.float32:
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        return True, "tf32" if tf32 else "ieee"
    return False, None


def _tile(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]; lo >= 16 keeps tl.dot legal on GPUs."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _tiles(num_tokens: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for both kernels. BLOCK_M 16: serving batches put a few dozen tokens
    at each depth, and tl.dot needs >= 16 (for the weight gradients it is the token chunk each program
    loops over). The small rank side (n for shrink, k for expand) gets one tile up to 64.
    Under the interpreter every program costs python overhead while wide tiles are numpy-vectorised,
    so tiles grow there to keep test grids at a handful of programs."""
    if _interpreting():
        return _tile(num_tokens, 16, 64), _tile(n, 16, 256), _tile(k, 16, 256)
    return 16, _tile(n, 16, 64), _tile(k, 16, 64)


def _check_segments(segments: DepthSegments, num_tokens: int, num_depths: int, device: torch.device) -> None:
    if segments.num_tokens != num_tokens or segments.num_depths != num_depths:
        raise ValueError(
            f"segments cover {segments.num_tokens} tokens and {segments.num_depths} depths, "
            f"the tensors have {num_tokens} tokens and {num_depths} depths"
        )
    for name in ("sorted_token_ids", "seg_start", "seg_len"):
        t = getattr(segments, name)
        if t.dtype != torch.int32 or not t.is_contiguous() or t.device != device:
            raise ValueError(
                f"segments.{name} must be a contiguous int32 tensor on {device}, got {t.dtype} on {t.device}"
            )


def _check_operand(
    name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype, device: torch.device, rows_contiguous: bool = True
) -> None:
    """Token-major operands (ndim 2) must have contiguous rows: each program loads whole row strips."""
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype or t.device != device:
        raise TypeError(f"{name} must be {dtype} on {device} like the input, got {t.dtype} on {t.device}")
    if rows_contiguous and t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have contiguous rows (stride(-1) == 1), got strides {t.stride()}")


def gather_matmul(
    inp: torch.Tensor,  # (T, K) float; rows at depth -1 are never read
    weight: torch.Tensor,  # (D, N, K) same dtype; any strides (a transposed view works, no copy)
    segments: DepthSegments,  # tokens grouped by depth, from sort_by_depth
    scale: float = 1.0,
) -> torch.Tensor:  # (T, N): out[t] = scale * weight[i_t] @ inp[t], 0 at depth -1
    """The per-token-weight matmul behind shrink, expand and the grad-input products.
    Reference: torch_ops.gather_matmul_ref."""
    if inp.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be one of {FLOAT_DTYPES}, got {inp.dtype}")
    _check_operand("input", inp, 2, inp.dtype, inp.device)
    _check_operand("weight", weight, 3, inp.dtype, inp.device, rows_contiguous=False)
    num_tokens, k = inp.shape
    num_depths, n, k_w = weight.shape
    if k_w != k:
        raise ValueError(f"weight (D, N, K) = {tuple(weight.shape)} does not match input (T, K) = {tuple(inp.shape)}")
    _check_segments(segments, num_tokens, num_depths, inp.device)
    out = inp.new_zeros(num_tokens, n)  # (T, N) zeros: the kernel never writes rows at depth -1
    if num_tokens == 0 or n == 0:
        return out
    block_m, block_n, block_k = _tiles(num_tokens, n, k)
    dot_fp32, precision = _dot_config(inp.dtype, inp.device)
    grid = (num_depths, triton.cdiv(num_tokens, block_m), triton.cdiv(n, block_n))
    _gather_matmul_kernel[grid](
        inp, weight, out, segments.sorted_token_ids, segments.seg_start, segments.seg_len,
        n, k,
        inp.stride(0), inp.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        out.stride(0), out.stride(1),
        float(scale),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_fp32, PRECISION=precision,
    )  # fmt: skip
    return out


def lora_shrink(
    x: torch.Tensor,  # (T, d_in)
    lora_a: torch.Tensor,  # (D, r, d_in)
    segments: DepthSegments,
) -> torch.Tensor:  # (T, r): h[t] = A[i_t] @ x[t], 0 at depth -1
    return gather_matmul(x, lora_a, segments)


def lora_expand(
    h: torch.Tensor,  # (T, r), may be a column slice of a wider h (fused projections)
    lora_b: torch.Tensor,  # (D, d_out, r)
    segments: DepthSegments,
    scale: float,
) -> torch.Tensor:  # (T, d_out): y[t] = scale * B[i_t] @ h[t], 0 at depth -1
    return gather_matmul(h, lora_b, segments, scale)


def lora_weight_grad(
    left: torch.Tensor,  # (T, N): the output-side gradient (dh for A, dy for B)
    right: torch.Tensor,  # (T, K): the input of the forward product (x for A, h for B)
    segments: DepthSegments,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,  # of the result (the weight's); default left's
) -> torch.Tensor:  # (D, N, K): out[d] = scale * sum_{t: i_t = d} left[t] right[t]^T, 0 for unused d
    """Per-depth reduction over tokens for dA and dB. Reference: torch_ops.segment_outer_ref."""
    if left.dtype not in FLOAT_DTYPES:
        raise TypeError(f"left must be one of {FLOAT_DTYPES}, got {left.dtype}")
    _check_operand("left", left, 2, left.dtype, left.device)
    _check_operand("right", right, 2, left.dtype, left.device)
    if left.shape[0] != right.shape[0]:
        raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} must have the same tokens")
    num_tokens, n = left.shape
    k = right.shape[1]
    _check_segments(segments, num_tokens, segments.num_depths, left.device)
    out = left.new_empty(segments.num_depths, n, k, dtype=dtype or left.dtype)  # every element is stored
    if out.numel() == 0:
        return out
    block_m, block_n, block_k = _tiles(num_tokens, n, k)
    dot_fp32, precision = _dot_config(left.dtype, left.device)
    grid = (segments.num_depths, triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _segment_outer_kernel[grid](
        left, right, out, segments.sorted_token_ids, segments.seg_start, segments.seg_len,
        n, k,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        float(scale),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_fp32, PRECISION=precision,
    )  # fmt: skip
    return out
