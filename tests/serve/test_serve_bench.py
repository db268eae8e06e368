"""The serving benchmark's pieces on a tiny model: the load, the two drivers, the report."""

from __future__ import annotations

import math

import pytest
import torch
from serve_helpers import load

from rrt_ray.serve.bench import (
    LOADS,
    ArmResult,
    Request,
    ServeBenchConfig,
    _arms,
    _percentile,
    _prefix_match,
    make_workload,
    run_engine_load,
    run_static_load,
    score_engine,
    score_hf,
    write_report,
)
from rrt_ray.serve.engine import Engine, EngineConfig


def test_workload_is_deterministic_and_in_range():
    cfg = ServeBenchConfig(model="unused", num_requests=10, prompt_tokens=(3, 9), output_tokens=(2, 5), eval_sequences=4, eval_prompt_tokens=4, eval_tokens=6)
    stream = list(range(1000))
    requests, evals = make_workload(cfg, stream)
    assert make_workload(cfg, stream) == (requests, evals)
    assert all(3 <= len(r.prompt) <= 9 and 2 <= r.max_tokens <= 5 and max(r.prompt) < 500 for r in requests)
    assert all(len(e) == 10 and min(e) >= 500 for e in evals)  # held apart from the prompts
    with pytest.raises(ValueError, match="prompt_tokens"):
        ServeBenchConfig(model="m", prompt_tokens=(5, 2))


def test_setups_pick_arms_and_unknown_ones_are_named():
    cfg = ServeBenchConfig(model="m", thresholds=(0.5,), draft_tokens=(4,))
    assert [a.key for a in _arms(cfg)] == ["a", "b", "c", "c merged", "d0.5", "e4", "e4 adaptive"]
    chosen = ServeBenchConfig(model="m", thresholds=(0.5,), draft_tokens=(4,), setups=("c merged", "e4 adaptive"))
    assert [(a.key, a.engine) for a in _arms(chosen)] == [("c merged", "merged"), ("e4 adaptive", "merged")]
    assert _arms(cfg)[5].engine == "merged constant"  # e4: the engine whose draft schedule is constant
    with pytest.raises(ValueError, match=r"unknown setup\(s\) \['e9'\]; allowed: a, b, c, c merged, d0.5, e4, e4 adaptive"):
        ServeBenchConfig(model="m", thresholds=(0.5,), draft_tokens=(4,), setups=("e9",))
    with pytest.raises(ValueError, match="draft_schedules must be among constant, heuristic"):
        ServeBenchConfig(model="m", draft_schedules=("sometimes",))


def test_percentile_and_prefix_match():
    assert _percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0 and _percentile([1.0, 2.0], 0.99) == 2.0
    assert _prefix_match([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]]) == pytest.approx(4 / 5)


def test_drivers_agree_with_each_other_and_the_report_renders(model_dirs, tmp_path):
    plain = load(model_dirs["plain"])
    requests = [Request([5, 6, 7, 8][: 1 + i % 4], 3 + i % 3) for i in range(6)]
    _, static_latencies, static_outputs = run_static_load(plain, requests, 3, pad_id=0)
    engine = Engine(load(model_dirs["plain"]), config=EngineConfig(max_num_seqs=3))
    _, latencies, outputs, loops = run_engine_load(engine, requests, 3, 1.0)
    assert [len(o) for o in outputs] == [r.max_tokens for r in requests] and len(latencies) == 6
    # left padding changes HF's numerics a little: compare the unpadded (longest-prompt) requests only
    assert all(outputs[i] == static_outputs[i] for i, r in enumerate(requests) if len(r.prompt) == 4)
    sequences = [[5, 9, 11, 13, 17, 19], [7, 8, 9, 10, 11, 12]]
    hf_logprobs, hf_argmax = score_hf(plain, sequences, 2)
    logprobs, argmax, _ = score_engine(engine, sequences, 2, 1.0)
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(hf_logprobs), rtol=0, atol=1e-4)
    assert argmax == hf_argmax
    cfg = ServeBenchConfig(model="tiny")
    arm = ArmResult("(a) x", 100.0, 0.1, 0.2, math.nan, 5.0, 0.5, 1.0, 1.0, walls=[1.0])
    spec = LOADS["mixed"]
    info = {"loads": {"mixed": {"requests": 6, "output_tokens": 24, "spec": spec}}, "recursive": "r", "params": {"original": 1e6, "recursive": 5e5}}
    results = [arm, ArmResult("(d0.5) y", 150.0, 0.1, 0.2, 1.5, 6.0, 0.45, 0.9, 0.8, walls=[1.0], weight_bytes=2_000_000)]
    write_report(cfg, {"mixed": results}, info, tmp_path / "r.md", None, "test")
    text = (tmp_path / "r.md").read_text()
    assert "| (d0.5) y | 150 | 1.50x | 2.0 |" in text and "1.50 |" in text
