"""GPU-readiness proven without a GPU: every tensor the engine makes is on the engine's device."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import load, random_prompts

from rrt_ray.serve import Engine, EngineConfig, SamplingParams


def _steps_under_meta_default(engine) -> list:
    """Drive the engine with the default device set to "meta": a tensor made without an explicit device
    lands on meta and the next op that mixes it with the engine's (CPU) tensors fails."""
    outs = []
    while engine.has_unfinished():
        with torch.device("meta"):
            outs += engine.step()
    return outs


@pytest.mark.parametrize("mode", [
    dict(exit_mode="confidence", exit_threshold=0.0),
    dict(exit_mode="speculative", draft_tokens=3),
    dict(exit_mode="none", temperature=0.8, seed=1, logprobs=2, prompt_logprobs=1),
])
def test_engine_steps_make_no_tensor_without_a_device(model_dirs, mode):
    engine = Engine(load(model_dirs[3]), config=EngineConfig(max_batch_tokens=8, device="cpu", weights="merged"))
    for prompt in random_prompts([5, 13], seed=41):
        engine.add_request(prompt, SamplingParams(max_tokens=6, ignore_eos=True, **mode))
    finals = [o for o in _steps_under_meta_default(engine) if o.finished]
    assert len(finals) == 2 and all(len(o.token_ids) == 6 for o in finals)


def test_the_meta_default_really_catches_a_tensor_made_without_a_device(model_dirs):
    engine = Engine(load(model_dirs[2]), config=EngineConfig(device="cpu"))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2))
    original = engine._make_batch

    def careless(units, loops):  # the bug this test exists for: positions built with torch.tensor(...) and no device=
        batch = original(units, loops)
        batch.pos = torch.tensor(batch.pos.tolist())
        return batch

    engine._make_batch = careless
    with pytest.raises((RuntimeError, NotImplementedError, ValueError)):
        _steps_under_meta_default(engine)


def test_device_and_dtype_settings(model_dirs):
    with pytest.raises(ValueError, match="allowed: auto, cpu, cuda"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            Engine(load(model_dirs[2]), config=EngineConfig(device="cuda"))
    engine = Engine(load(model_dirs[2]), config=EngineConfig(device="auto", dtype="float32"))
    assert engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_engine_on_cuda_agrees_with_fp32(model_dirs):
    prompts = random_prompts([5, 13], seed=42)
    ref = Engine(load(model_dirs[3]), config=EngineConfig(device="cpu")).generate(prompts, SamplingParams(max_tokens=8))
    gpu = Engine(load(model_dirs[3]), config=EngineConfig(device="cuda", dtype="bfloat16")).generate(prompts, SamplingParams(max_tokens=8))
    assert sum(a == b for r, g in zip(ref, gpu) for a, b in zip(r.token_ids, g.token_ids)) >= 12
