"""Plain-torch multi-LoRA: the readable references beside each Triton kernel, and the CPU strategies.

    y_t = scale * B[i_t] @ (A[i_t] @ x_t)        i_t in [-1, D), i_t = -1 -> y_t = 0

References (what the kernels in `triton_ops` are tested against, one per kernel):
  * `gather_matmul_ref`   out_t = scale * W[i_t] @ in_t      shrink, expand, and both grad-input kernels
  * `segment_outer_ref`   out_d = scale * sum_{t: i_t = d} left_t right_t^T      grad_A and grad_B
  * `multi_lora_reference`  the whole op as a per-depth loop with boolean masks; also the "naive
    per-depth python loop" baseline of jobs/bench_lora.py.

Strategies for the full op on CPU (all differentiable by plain autograd), measured by
jobs/bench_lora.py and recorded in results/bench_lora.md:
  * "segmented"  sort tokens by depth once, one (x_seg A_d^T) B_d^T per depth segment, scatter back
  * "gather_bmm" gather A[i_t], B[i_t] per token and bmm: no loop, but T copies of the weights
  * "masked"     every depth's LoRA on every token, keep the token's own depth: D x the flops,
                 no gather or scatter
  * "reference"  the boolean-mask loop: a nonzero() scan of the whole index per depth
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rrt_ray.kernels.segments import depth_runs


def gather_matmul_ref(
    inp: torch.Tensor, weight: torch.Tensor, depth_index: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """out_t = scale * weight[i_t] @ inp_t, 0 where i_t = -1.

    inp (T, K), weight (D, N, K) (any strides), depth_index (T,) -> out (T, N), computed in fp32.
    """
    out = inp.new_zeros(inp.shape[0], weight.shape[1], dtype=torch.float32)  # (T, N)
    for d in range(weight.shape[0]):
        rows = depth_index == d  # (T,) bool
        out[rows] = scale * (inp[rows].float() @ weight[d].float().T)
    return out.to(inp.dtype)


def segment_outer_ref(
    left: torch.Tensor, right: torch.Tensor, depth_index: torch.Tensor, num_depths: int, scale: float = 1.0
) -> torch.Tensor:
    """out_d = scale * sum_{t: i_t = d} left_t right_t^T: the per-depth gradient of a weight.

    left (T, N), right (T, K), depth_index (T,) -> out (D, N, K), computed in fp32; 0 for unused depths.
    """
    out = left.new_zeros(num_depths, left.shape[1], right.shape[1], dtype=torch.float32)  # (D, N, K)
    for d in range(num_depths):
        rows = depth_index == d
        out[d] = scale * (left[rows].float().T @ right[rows].float())
    return out.to(left.dtype)


def multi_lora_reference(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, depth_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """The definition: for every depth, the rows at that depth get their LoRA. x (T, d_in) -> (T, d_out)."""
    y = x.new_zeros(x.shape[0], lora_b.shape[1])  # (T, d_out)
    for d in range(lora_a.shape[0]):
        rows = depth_index == d  # (T,) bool
        y[rows] = scale * ((x[rows] @ lora_a[d].T) @ lora_b[d].T)
    return y


def multi_lora_segmented(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, depth_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """Sort once, then per depth segment: gather its rows, two dense matmuls, scatter them back.

    One argsort replaces the naive loop's D full-index scans (mask + nonzero), which is what counts
    at small T. Each segment scatters straight into y: a first version that cat-ed the segments and
    scattered once was up to 20% slower at T=256 (one more pass over (T, d_out)).

    Rows already grouped by depth (the serving engine orders them so) skip the sort, the gather and
    the scatter: each run is a slice of x, and the outputs are concatenated.
    """
    num_depths = lora_a.shape[0]
    runs = depth_runs(depth_index)
    if 0 < len(runs) <= num_depths + 1 and any(d >= 0 for d, _, _ in runs):
        pieces = [
            x.new_zeros(end - start, lora_b.shape[1]) if d < 0 else ((x[start:end] @ lora_a[d].T) * scale) @ lora_b[d].T
            for d, start, end in runs
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    depth = depth_index.long()  # (T,)
    order = torch.argsort(depth)  # (T,) token ids: depth -1 first, then depth 0, 1, ...
    counts = torch.bincount(depth + 1, minlength=num_depths + 1).tolist()  # D+1 ints, slot 0: depth -1
    y = x.new_zeros(x.shape[0], lora_b.shape[1])  # (T, d_out), rows at depth -1 stay 0
    start = counts[0]
    for d, n in enumerate(counts[1:]):
        if n:
            rows = order[start : start + n]  # (n,) the tokens at depth d
            y.index_copy_(0, rows, ((x.index_select(0, rows) @ lora_a[d].T) * scale) @ lora_b[d].T)
        start += n
    if start == counts[0]:  # every token at depth -1: an empty product keeps the graph (zero grads, not None)
        y = y + (x[:0] @ lora_a[0].T @ lora_b[0].T).sum()
    return y


def multi_lora_gather_bmm(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, depth_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """Gather each token's A and B, then two batched mat-vecs (Punica's BGMV in torch)."""
    safe = depth_index.long().clamp_min(0)  # (T,) depth -1 reads depth 0, masked below
    h = torch.bmm(lora_a[safe], x.unsqueeze(-1))  # (T, r, 1), lora_a[safe] is (T, r, d_in)
    y = torch.bmm(lora_b[safe], h).squeeze(-1)  # (T, d_out)
    return y * (scale * (depth_index >= 0)).unsqueeze(-1).to(y.dtype)


def multi_lora_masked(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, depth_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """Every depth's LoRA on every token, each token keeps its own: dense, no gather, D x the flops."""
    y = x.new_zeros(x.shape[0], lora_b.shape[1])  # (T, d_out)
    for d in range(lora_a.shape[0]):
        keep = (depth_index == d).unsqueeze(-1).to(x.dtype)  # (T, 1)
        y = y + keep * ((x @ lora_a[d].T) @ lora_b[d].T)
    return scale * y


TorchStrategy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

TORCH_STRATEGIES: dict[str, TorchStrategy] = {
    "segmented": multi_lora_segmented,
    "gather_bmm": multi_lora_gather_bmm,
    "masked": multi_lora_masked,
    "reference": multi_lora_reference,
}

# The torch backend's strategy, chosen by measurement: jobs/bench_lora.py, 2 cores, fp32, d = 2048,
# tokens spread uniformly over D depths, forward, microseconds per call (results/bench_lora.md):
#
#     T    D   r    naive loop   segmented   gather_bmm   masked
#     1    4   64        104          60         126        168
#     16   2   8         107         102         451        107
#     256  4   64       1503        1355      124260       4161
#     256  2   512      9863        9539     (skipped)     16268
#
# Over the 24-case grid "segmented" was fastest in 20 cases, 1.10x the naive loop (geometric mean):
# 1.7-2.2x at T=1, D=4, where the loop's D full-index scans dominate, a tie (+-10%, the spread between
# runs on this shared machine) at large T and r, where both run the same matmuls. gather_bmm copies
# the weights per token (0.13x); masked does D x the flops (0.58x). It came first in each of six runs.
# With the slice path for rows grouped by depth (a single token is one run), the latest run has it
# fastest in 21/24, 1.27x (2.6-4.4x at T=1); rows in the engine's depth order take 1.2-1.8x at T=16-256
# for r <= 64, against ~1.0-1.2x unordered.
DEFAULT_TORCH_STRATEGY = "segmented"
