"""Tokens grouped by loop depth: the one piece of index work every multi-LoRA path shares.

A continuous depth-wise batch holds tokens at different depths, e.g. depth_index = [1, 0, -1, 1, 0]
(-1: padding, no LoRA). Sorting the token ids by depth turns it into contiguous segments,

    sorted_token_ids = [2 | 1 4 | 0 3]      seg_start = [1, 3]   seg_len = [2, 2]
                        -1   d=0    d=1

so that every depth runs one dense matmul over its own tokens (Punica's SGMV, vLLM's
`token_lora_mapping` -> `lora_token_start_loc`). Built once per call, on the tokens' device, with no
host sync; the forward and every backward kernel of one call reuse it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

# The input dtypes every multi-LoRA path accepts.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DepthSegments:
    """Token ids sorted by depth; depth d owns sorted_token_ids[seg_start[d] : seg_start[d] + seg_len[d]].

    Tokens at depth -1 sort first and belong to no segment, so nothing ever reads or writes them.
    """

    sorted_token_ids: torch.Tensor  # (T,) int32, tokens at depth -1 first, then depth 0, 1, ...
    seg_start: torch.Tensor  # (D,) int32, offset of depth d's first token in sorted_token_ids
    seg_len: torch.Tensor  # (D,) int32, number of tokens at depth d (0 for an unused depth)
    num_depths: int

    @property
    def num_tokens(self) -> int:
        return self.sorted_token_ids.shape[0]


def sort_by_depth(depth_index: torch.Tensor, num_depths: int) -> DepthSegments:
    """Group the tokens of `depth_index` (T,) int, values in [-1, num_depths), into depth segments."""
    depth = depth_index.long()  # (T,)
    sorted_ids = torch.argsort(depth, stable=True)  # (T,) stable: tokens of one depth keep their order
    counts = torch.bincount(depth + 1, minlength=num_depths + 1)  # (D+1,) slot 0 counts depth -1
    starts = torch.cumsum(counts, 0) - counts  # (D+1,) exclusive prefix sum
    return DepthSegments(
        sorted_token_ids=sorted_ids.to(torch.int32),
        seg_start=starts[1:].to(torch.int32),
        seg_len=counts[1:].to(torch.int32),
        num_depths=num_depths,
    )


# ---------------------------------------------------------------------------------------------------
# Host-side runs, for the CPU paths.
#
# The serving engine orders its rows by loop depth, so a continuous depth-wise batch arrives as a few
# contiguous runs, e.g. [0 0 0 1 1] -> (0, 0, 3), (1, 3, 5). Each run is then a plain slice of x: no
# argsort, no gather, no scatter, and one run is exactly the uniform-depth cost. Every LoRA and norm
# of one layer call sees the same depth tensor, so the runs are computed once and remembered (TensorMemo).

Run = tuple[int, int, int]  # (depth, start, end): rows start..end-1 are all at `depth`

class TensorMemo:
    """Remembers, per thread, one value derived from the last tensor it was given.

    One serving step sends the same depth tensor through every LoRA and norm of a layer call (7+ per
    layer), so what is derived from it (runs, a range check) is worth keeping for the next call. A hit
    needs the same memory, shape, strides and version counter (bumped by any in-place write, through any
    view); the strong reference keeps that memory from being freed and reused by another tensor.
    Inference tensors (torch.inference_mode) have no version counter: for them a hit also needs equal
    contents, compared with a snapshot (a cheap comparison of T ints; on CUDA one sync, as the work it
    saves would cost). Thread-local, so concurrent callers never see each other's tensors.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @staticmethod
    def _key(t: torch.Tensor, extra: Any) -> tuple:
        version = None if t.is_inference() else t._version
        return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride(), version, extra)

    def get(self, t: torch.Tensor, extra: Any = None) -> Any | None:
        last = getattr(self._local, "last", None)
        if last is None or last[1] != self._key(t, extra):
            return None
        snapshot = last[2]
        if snapshot is not None and not torch.equal(snapshot, t):
            return None
        return last[3]

    def put(self, t: torch.Tensor, value: Any, extra: Any = None) -> None:
        snapshot = t.clone() if t.is_inference() else None
        self._local.last = (t, self._key(t, extra), snapshot, value)


_runs_memo = TensorMemo()


def depth_runs(depth_index: torch.Tensor) -> list[Run]:
    """Maximal runs of equal depth in `depth_index` (any shape, read flattened, row-major)."""
    runs = _runs_memo.get(depth_index)
    if runs is not None:
        return runs
    flat = depth_index.reshape(-1)
    if flat.numel() == 0:
        runs = []
    else:
        starts = [0] + (torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1).tolist()
        depths = flat[starts].tolist()
        ends = starts[1:] + [flat.numel()]
        runs = list(zip(depths, starts, ends))
    _runs_memo.put(depth_index, runs)
    return runs
