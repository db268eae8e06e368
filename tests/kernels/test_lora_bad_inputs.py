"""Every mistake a caller can make raises one clear ValueError/TypeError naming the bad value."""

from __future__ import annotations

import pytest
import torch

from rrt_ray.kernels import multi_lora, multi_lora_fused

T, D_IN, D_OUT, R, D = 6, 12, 10, 4, 3


def _good():
    return {
        "x": torch.randn(T, D_IN),
        "lora_a": torch.randn(D, R, D_IN),
        "lora_b": torch.randn(D, D_OUT, R),
        "depth_index": torch.tensor([0, 1, 2, -1, 0, 1]),
        "scale": 1.0,
    }


BAD = {
    "x_3d": ({"x": torch.randn(2, T, D_IN)}, ValueError, r"x must be 2-D \(tokens, d_in\), got shape \(2, 6, 12\)"),
    "x_int": ({"x": torch.ones(T, D_IN, dtype=torch.int64)}, TypeError, "x must be one of"),
    "x_list": ({"x": [[0.0] * D_IN] * T}, TypeError, "x must be a torch.Tensor, got list"),
    "a_2d": ({"lora_a": torch.randn(R, D_IN)}, ValueError, r"lora_a must be 3-D, got shape \(4, 12\)"),
    "a_d_in": ({"lora_a": torch.randn(D, R, D_IN + 1)}, ValueError, "d_in 13 != 12"),
    "b_rank": ({"lora_b": torch.randn(D, D_OUT, R + 1)}, ValueError, "rank 5 != 4"),
    "b_depths": ({"lora_b": torch.randn(D + 1, D_OUT, R)}, ValueError, "lora_a has 3 depths and lora_b has 4"),
    "no_depths": (
        {"lora_a": torch.randn(0, R, D_IN), "lora_b": torch.randn(0, D_OUT, R), "depth_index": -1},
        ValueError, "lora_a has 0 depths",
    ),  # fmt: skip
    "a_dtype": ({"lora_a": torch.randn(D, R, D_IN, dtype=torch.bfloat16)}, TypeError, "lora_a must have x's dtype"),
    "index_too_big": (
        {"depth_index": torch.tensor([0, 1, 3, -1, 0, 1])}, ValueError, r"holds 3: allowed -1 \(no LoRA\) .. 2"
    ),  # fmt: skip
    "index_below_minus_one": ({"depth_index": torch.tensor([0, -2, 0, 0, 0, 0])}, ValueError, "holds -2: allowed -1"),
    "int_too_big": ({"depth_index": 3}, ValueError, r"depth_index 3 is out of range: allowed -1 \(no LoRA\) .. 2"),
    "int_below_minus_one": ({"depth_index": -2}, ValueError, "depth_index -2 is out of range"),
    "index_float": ({"depth_index": torch.zeros(T)}, TypeError, "int32 or int64, got torch.float32"),
    "index_bool": ({"depth_index": torch.zeros(T, dtype=torch.bool)}, TypeError, "int32 or int64, got torch.bool"),
    "index_python_float": ({"depth_index": 1.0}, TypeError, "an int or an int32/int64 tensor, got float"),
    "index_python_bool": ({"depth_index": True}, TypeError, "got bool"),
    "index_2d": ({"depth_index": torch.zeros(2, 3, dtype=torch.int64)}, ValueError, r"shape \(6,\).*got \(2, 3\)"),
    "index_length": ({"depth_index": torch.zeros(T + 1, dtype=torch.int64)}, ValueError, r"shape \(6,\).*got \(7,\)"),
    "scale_tensor": ({"scale": torch.tensor(1.0)}, TypeError, "scale must be a python float, got Tensor"),
    "backend": ({"backend": "cuda"}, ValueError, "backend='cuda' is not a multi-LoRA backend: allowed auto"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises(case, backend):
    change, error, message = BAD[case]
    kwargs = {**_good(), "backend": backend, **change}
    with pytest.raises(error, match=message):
        multi_lora(**kwargs)


def test_good_input_passes():
    assert multi_lora(**_good()).shape == (T, D_OUT)


def test_fused_bad_inputs_name_the_projection():
    good = _good()
    x, a, b, idx = good["x"], good["lora_a"], good["lora_b"], good["depth_index"]
    with pytest.raises(ValueError, match="non-empty list"):
        multi_lora_fused(x, [], idx, 1.0)
    with pytest.raises(ValueError, match=r"loras\[1\]\[1\] \(B\).*rank 3 != 4"):
        multi_lora_fused(x, [(a, b), (a, b[..., :3])], idx, 1.0)
    with pytest.raises(ValueError, match=r"same number of depths, got \[2, 3\]"):
        multi_lora_fused(x, [(a, b), (a[:2], b[:2])], torch.zeros(T, dtype=torch.int64), 1.0)


def test_range_check_is_cached_per_index_but_sees_in_place_writes(monkeypatch):
    """One serving step reuses one index for every projection: it is range-checked once, yet an
    in-place write (through any view) invalidates that check."""
    calls = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append(1) or real_aminmax(t))
    good = _good()
    idx = good.pop("depth_index").clone()
    for _ in range(3):
        multi_lora(**good, depth_index=idx)
        multi_lora(**good, depth_index=idx.reshape(-1))  # a new view of the same memory
    assert len(calls) == 1
    idx.view(2, 3)[0, 2] = D  # out of range, written through another view
    with pytest.raises(ValueError, match="holds 3"):
        multi_lora(**good, depth_index=idx)
