"""A/B of the engine step's autograd context: torch.no_grad (before) vs torch.inference_mode (now).

Both sides in one process, interleaved, best of --rounds each, same greedy outputs asserted:

    python jobs/bench_step_context.py --model ORIGINAL_DIR --recursive RECURSIVE_DIR

(b) is the original model on the engine (LoRA path: no LoRA in a plain model), (c merged) the recursive one with
per-depth merged weights; 16 prompts of 16-64 tokens cut from the default corpus, 64 new tokens each, 1 thread.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rrt_ray  # noqa: F401  (registers the recursive model)
from rrt_ray.serve.bench import token_stream
from rrt_ray.serve.engine import Engine, EngineConfig
from rrt_ray.serve.sampling import SamplingParams


def timed(path: str, weights: str, step, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    Engine.step = step
    engine = Engine(AutoModelForCausalLM.from_pretrained(path).eval(), config=EngineConfig(weights=weights, max_batch_tokens=512, max_model_len=512))
    engine.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0))  # warm-up
    start = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=64, ignore_eos=True, temperature=0, exit_mode="none"))
    return time.perf_counter() - start, [o.token_ids for o in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the original model directory (with its tokenizer)")
    parser.add_argument("--recursive", required=True, help="a recursive model made from it")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each side keeps its best")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stream = token_stream(AutoTokenizer.from_pretrained(args.model))
    rng = random.Random(0)
    prompts = [stream[s : s + rng.randint(16, 64)] for s in [rng.randrange(0, len(stream) - 100) for _ in range(16)]]
    inference, no_grad = Engine.step, torch.no_grad()(Engine.step.__wrapped__)
    walls: dict[tuple[str, str], list[float]] = {}
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    for _ in range(args.rounds):
        for name, path, weights in (("b", args.model, "lora"), ("c merged", args.recursive, "merged")):
            for label, step in (("no_grad", no_grad), ("inference_mode", inference)):
                wall, outs = timed(path, weights, step, prompts)
                walls.setdefault((name, label), []).append(wall)
                assert outputs.setdefault((name, label), outs) == outs
    Engine.step = inference
    for name in ("b", "c merged"):
        before, after = min(walls[(name, "no_grad")]), min(walls[(name, "inference_mode")])
        same = outputs[(name, "no_grad")] == outputs[(name, "inference_mode")]
        print(f"({name}) no_grad {before:.2f} s, inference_mode {after:.2f} s: {before / after:.2f}x; same outputs: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
