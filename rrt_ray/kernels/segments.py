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

from dataclasses import dataclass

import torch


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
# of one layer call sees the same depth tensor, so the runs are computed once and remembered.

Run = tuple[int, int, int]  # (depth, start, end): rows start..end-1 are all at `depth`

_last_runs: tuple[torch.Tensor, tuple, list[Run]] | None = None


def _runs_key(t: torch.Tensor) -> tuple:
    # The tensor itself is held by the cache, so its storage (data_ptr) cannot be reused meanwhile;
    # _version changes on any in-place write, through the tensor or a view of it.
    return (t.device, t.dtype, t.data_ptr(), t.numel(), t.is_contiguous(), t._version)


def depth_runs(depth_index: torch.Tensor) -> list[Run]:
    """Maximal runs of equal depth in `depth_index` (any shape, read flattened, row-major)."""
    global _last_runs
    key, last = _runs_key(depth_index), _last_runs  # one read: another thread may replace it meanwhile
    if last is not None and last[1] == key:
        return last[2]
    flat = depth_index.reshape(-1)
    if flat.numel() == 0:
        runs: list[Run] = []
    else:
        starts = [0] + (torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1).tolist()
        depths = flat[starts].tolist()
        ends = starts[1:] + [flat.numel()]
        runs = list(zip(depths, starts, ends))
    _last_runs = (depth_index, key, runs)
    return runs
