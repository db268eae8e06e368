"""The serving benchmark behind jobs/bench_serve.py: throughput, latency and quality of four setups.

    (a) the original model, Hugging Face `generate` with static batches (a batch runs until its longest
        request is done; prompts left-padded)
    (b) the original model on the engine (continuous batching)
    (c) the recursive model on the engine, no early exit (every token runs all loops)
    (d) the recursive model on the engine, continuous depth-wise batching + early exit, per threshold

Load: the same request list for every setup (prompt and output lengths drawn from ranges, prompts cut from
held-out text), greedy, outputs of fixed length (eos ignored, so every setup generates the same tokens),
a closed loop of `concurrency` clients: a client sends its next request when its previous one is answered.
The engine is driven in-process (no HTTP), so the numbers are the engine's, not Ray Serve's.

Quality, teacher-forced on held-out sequences with each setup's own exits: perplexity, next-token accuracy,
and top-1 agreement with the same model at full depth; plus, on the load's greedy outputs, the fraction of
tokens before the first divergence from the full-depth output.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rrt_ray.serve.engine import Engine, EngineConfig
from rrt_ray.serve.sampling import SamplingParams


@dataclasses.dataclass
class ServeBenchConfig:
    """model: the original HF model directory (with its tokenizer). recursive: a recursive model made
    from it (converted or uptrained); None converts one here with loops / lora_rank / init."""

    model: str
    recursive: str | None = None
    loops: int = 2
    lora_rank: int = 64
    init: str = "average"
    num_requests: int = 48
    concurrency: int = 16
    prompt_tokens: tuple[int, int] = (16, 160)
    output_tokens: tuple[int, int] = (16, 96)
    thresholds: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.1)
    eval_sequences: int = 24
    eval_prompt_tokens: int = 32
    eval_tokens: int = 96
    repeats: int = 2
    max_batch_tokens: int = 512
    kv_fill: str = "propagate"
    torch_threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_requests", "concurrency", "eval_sequences", "eval_tokens", "repeats", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prompt_tokens", "output_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be a range (low, high) with 1 <= low <= high, got {(low, high)}")
        if any(not 0.0 <= t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be in [0, 1), got {self.thresholds}")


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_tokens: int


@dataclasses.dataclass
class ArmResult:
    name: str
    tokens_per_s: float
    p50_s: float
    p99_s: float
    mean_exit_loops: float
    perplexity: float
    accuracy: float  # held-out next-token accuracy
    agreement: float  # teacher-forced top-1 agreement with the same model at full depth
    prefix_match: float  # greedy outputs: fraction of tokens before the first divergence from full depth
    outputs: list[list[int]] = dataclasses.field(default_factory=list, repr=False)
    walls: list[float] = dataclasses.field(default_factory=list, repr=False)


def token_stream(tokenizer, max_bytes: int = 3_000_000) -> list[int]:
    """Held-out text of the default corpus as one token stream."""
    from rrt_ray.data import load_texts

    texts = load_texts("default", "heldout", max_bytes)
    return [t for text in texts for t in tokenizer.encode(text)]


def make_workload(cfg: ServeBenchConfig, stream: list[int]) -> tuple[list[Request], list[list[int]]]:
    """Requests cut from the first half of the stream, evaluation sequences from the second half."""
    rng = random.Random(cfg.seed)
    half = len(stream) // 2
    requests = []
    for _ in range(cfg.num_requests):
        n = rng.randint(*cfg.prompt_tokens)
        start = rng.randrange(0, half - n)
        requests.append(Request(stream[start : start + n], rng.randint(*cfg.output_tokens)))
    length = cfg.eval_prompt_tokens + cfg.eval_tokens
    evals = []
    for _ in range(cfg.eval_sequences):
        start = rng.randrange(half, len(stream) - length)
        evals.append(stream[start : start + length])
    return requests, evals


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def run_engine_load(engine: Engine, requests: list[Request], concurrency: int, threshold: float) -> tuple[float, list[float], list[list[int]], list[int]]:
    """Closed loop: wall seconds, per-request latencies, outputs, exit loops of every token."""
    pending = list(enumerate(requests))[::-1]
    started_at: dict[str, tuple[int, float]] = {}
    latencies = [0.0] * len(requests)
    outputs: list[list[int]] = [[] for _ in requests]
    loops: list[int] = []

    def submit() -> None:
        index, request = pending.pop()
        params = SamplingParams(max_tokens=request.max_tokens, ignore_eos=True, exit_threshold=threshold)
        rid = engine.add_request(request.prompt, params, request_id=f"bench-{index}")
        started_at[rid] = (index, time.perf_counter())

    begin = time.perf_counter()
    while pending and len(started_at) < concurrency:
        submit()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                index, t0 = started_at.pop(out.request_id)
                latencies[index] = time.perf_counter() - t0
                outputs[index] = out.token_ids
                loops += out.exit_loops
                if pending:
                    submit()
    return time.perf_counter() - begin, latencies, outputs, loops


def run_static_load(model, requests: list[Request], concurrency: int, pad_id: int) -> tuple[float, list[float], list[list[int]]]:
    """HF generate in static batches of `concurrency` requests, in order, left-padded."""
    latencies, outputs = [], []
    begin = time.perf_counter()
    for b in range(0, len(requests), concurrency):
        batch = requests[b : b + concurrency]
        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        new = max(r.max_tokens for r in batch)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id)
        seconds = time.perf_counter() - t0
        for i, r in enumerate(batch):
            latencies.append(seconds)
            outputs.append(out[i, width : width + r.max_tokens].tolist())
    return time.perf_counter() - begin, latencies, outputs


def score_engine(engine: Engine, sequences: list[list[int]], prompt_len: int, threshold: float) -> tuple[list[float], list[int], list[int]]:
    """Teacher-forced: log p of each held-out token, the exit head's argmax, the exit loops."""
    ids = []
    for i, seq in enumerate(sequences):
        ids.append(engine.add_request(seq[:prompt_len], SamplingParams(exit_threshold=threshold), f"score-{i}", teacher_ids=seq[prompt_len:]))
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    logprobs = [lp for i in ids for lp in finals[i].logprobs]
    argmax = [a for i in ids for a in finals[i].argmax_ids]
    loops = [n for i in ids for n in finals[i].exit_loops]
    return logprobs, argmax, loops


def score_hf(model, sequences: list[list[int]], prompt_len: int) -> tuple[list[float], list[int]]:
    with torch.no_grad():
        logits = model(torch.tensor(sequences)).logits[:, prompt_len - 1 : -1].float()  # (S, T, V)
    targets = torch.tensor([s[prompt_len:] for s in sequences])
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    return logprobs.flatten().tolist(), logits.argmax(-1).flatten().tolist()


def _prefix_match(outputs: list[list[int]], reference: list[list[int]]) -> float:
    matched = total = 0
    for out, ref in zip(outputs, reference):
        n = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        matched, total = matched + n, total + len(ref)
    return matched / max(total, 1)


def run_benchmark(cfg: ServeBenchConfig, log: Callable[[str], None] = print) -> tuple[list[ArmResult], dict]:
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rrt_ray  # noqa: F401
    from rrt_ray.convert import convert_checkpoint

    torch.set_num_threads(cfg.torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    original, original_engine_model = load(cfg.model), load(cfg.model)
    recursive_dir = cfg.recursive
    if recursive_dir is None:
        recursive_dir = tempfile.mkdtemp(prefix="rrt-bench-serve-")
        convert_checkpoint(cfg.model, recursive_dir, loops=cfg.loops, init=cfg.init, lora_rank=cfg.lora_rank, progress=False, overwrite=True)
    recursive = load(recursive_dir)
    stream = token_stream(tokenizer)
    requests, evals = make_workload(cfg, stream)
    total_tokens = sum(r.max_tokens for r in requests)
    max_len = max(cfg.prompt_tokens[1] + cfg.output_tokens[1], len(evals[0])) + 1
    engine_config = EngineConfig(max_num_seqs=max(cfg.concurrency, cfg.eval_sequences), max_batch_tokens=cfg.max_batch_tokens, max_model_len=max_len, kv_fill=cfg.kv_fill)
    engines = {"original": Engine(original_engine_model, config=engine_config), "recursive": Engine(recursive, config=engine_config)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    arms = [("a", "original, HF generate (static batches)", None, None), ("b", "original, engine", "original", 1.0), ("c", "recursive, engine, no early exit", "recursive", 1.0)]
    arms += [(f"d{t}", f"recursive, engine, CDB + early exit @ {t}", "recursive", t) for t in cfg.thresholds]
    log(f"workload: {len(requests)} requests, {total_tokens} output tokens, concurrency {cfg.concurrency}; recursive model {recursive_dir}")

    # warm-up (first calls allocate), then `repeats` interleaved rounds; the best wall time is kept
    run_engine_load(engines["original"], requests[:2], 2, 1.0)
    run_engine_load(engines["recursive"], requests[:2], 2, 0.5)
    walls: dict[str, list[float]] = {key: [] for key, *_ in arms}
    measured: dict[str, tuple] = {}
    for round_ in range(cfg.repeats):
        for key, name, which, threshold in arms:
            if which is None:
                wall, latencies, outputs = run_static_load(original, requests, cfg.concurrency, pad_id)
                loops = [1] * total_tokens
            else:
                wall, latencies, outputs, loops = run_engine_load(engines[which], requests, cfg.concurrency, threshold)
            walls[key].append(wall)
            if key not in measured or wall < measured[key][0]:
                measured[key] = (wall, latencies, outputs, loops)
            log(f"round {round_ + 1}: {key:6s} {total_tokens / wall:8.1f} tok/s  ({name})")

    # quality, teacher-forced on held-out sequences
    p = cfg.eval_prompt_tokens
    targets = [t for seq in evals for t in seq[p:]]
    hf_logprobs, hf_argmax = score_hf(original, evals, p)
    full_depth = {"original": hf_argmax, "recursive": score_engine(engines["recursive"], evals, p, 1.0)[1]}
    results = []
    for key, name, which, threshold in arms:
        if which is None:
            logprobs, argmax, eval_loops = hf_logprobs, hf_argmax, [1]
        else:
            logprobs, argmax, eval_loops = score_engine(engines[which], evals, p, threshold)
        reference = full_depth[which or "original"]
        wall, latencies, outputs, loops = measured[key]
        reference_outputs = measured["a" if which in (None, "original") else "c"][2]
        results.append(ArmResult(
            name=f"({key}) {name}",
            tokens_per_s=total_tokens / wall,
            p50_s=_percentile(latencies, 0.5),
            p99_s=_percentile(latencies, 0.99),
            mean_exit_loops=statistics.fmean(loops) if which == "recursive" else float("nan"),
            perplexity=math.exp(-statistics.fmean(logprobs)),
            accuracy=statistics.fmean(float(a == t) for a, t in zip(argmax, targets)),
            agreement=statistics.fmean(float(a == r) for a, r in zip(argmax, reference)),
            prefix_match=_prefix_match(outputs, reference_outputs),
            outputs=outputs, walls=walls[key],
        ))
        log(f"{key:6s} ppl {results[-1].perplexity:.2f}  acc {results[-1].accuracy:.3f}  eval exit loops {statistics.fmean(eval_loops):.2f}")
    info = {
        "requests": len(requests), "output_tokens": total_tokens, "recursive": recursive_dir,
        "stats": {k: dict(e.stats) for k, e in engines.items()},
        "exit_loop_counts": engines["recursive"].exit_loop_counts,
        "params": {"original": sum(p.numel() for p in original.parameters()), "recursive": sum(p.numel() for p in recursive.parameters())},
    }
    return results, info


def write_report(
    cfg: ServeBenchConfig, results: list[ArmResult], info: dict, out_md: Path, out_png: Path | None, machine: str,
    command: str | None = None,
) -> None:
    """The results file (and the PNG); `command` is the exact command line that produced them."""
    base = results[0]
    lines = [
        "# Serving benchmark: static batching vs continuous batching vs depth-wise batching with early exit",
        "",
        f"`{command or f'python jobs/bench_serve.py --model {cfg.model}'}` ({machine}).",
        "",
        f"Load: {info['requests']} requests, the same list for every setup; prompts {cfg.prompt_tokens[0]}-{cfg.prompt_tokens[1]} tokens "
        f"and outputs {cfg.output_tokens[0]}-{cfg.output_tokens[1]} tokens (uniform; {info['output_tokens']} output tokens in all, "
        f"eos ignored), greedy, a closed loop of {cfg.concurrency} concurrent clients. The engine runs in-process (no HTTP). "
        f"Best of {cfg.repeats} interleaved rounds; fp32, {cfg.torch_threads} torch thread(s).",
        f"Models: original {info['params']['original'] / 1e6:.2f}M parameters; recursive ({info['recursive']}) "
        f"{info['params']['recursive'] / 1e6:.2f}M.",
        f"Quality: teacher-forced on {cfg.eval_sequences} held-out sequences ({cfg.eval_prompt_tokens}-token prefix, "
        f"{cfg.eval_tokens} scored tokens) with each setup's own exits; agreement = top-1 agreement with the same model at "
        "full depth; prefix match = share of the load's greedy output tokens before the first divergence from the "
        "full-depth output ((a) for (b), (c) for (d)).",
        "",
        "| setup | tokens/s | vs (a) | p50 latency s | p99 latency s | mean exit loops | held-out ppl | next-token acc | agreement | prefix match |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        loops = "-" if math.isnan(r.mean_exit_loops) else f"{r.mean_exit_loops:.2f}"
        lines.append(
            f"| {r.name} | {r.tokens_per_s:.0f} | {r.tokens_per_s / base.tokens_per_s:.2f}x | {r.p50_s:.2f} | {r.p99_s:.2f} | {loops} | "
            f"{r.perplexity:.2f} | {100 * r.accuracy:.1f}% | {100 * r.agreement:.1f}% | {100 * r.prefix_match:.1f}% |"
        )
    lines += ["", "Every round's tokens/s: " + "; ".join(f"{r.name.split(')')[0]}) " + ", ".join(f"{info['output_tokens'] / w:.0f}" for w in r.walls) for r in results) + "."]
    if out_png is not None:
        lines += ["", f"![throughput vs quality]({out_png.name})"]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    if out_png is not None:
        _plot(results, out_png)


def _plot(results: list[ArmResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r.tokens_per_s, 100 * r.accuracy, s=40)
        ax.annotate(r.name.split(")")[0] + ")", (r.tokens_per_s, 100 * r.accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("throughput, generated tokens/s")
    ax.set_ylabel("held-out next-token accuracy, %")
    ax.set_title("Serving: throughput vs quality (same load for every setup)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
