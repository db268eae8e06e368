"""The serving benchmark behind jobs/bench_serve.py: throughput, latency and quality of five setups.

    (a) the original model, Hugging Face `generate` with static batches (a batch runs until its longest
        request is done; prompts left-padded)
    (b) the original model on the engine (continuous batching)
    (c) the recursive model on the engine, no early exit (every token runs all loops); "(c merged)" with
        per-depth merged weights W' + B_b A_b instead of LoRA
    (d) the recursive model on the engine, continuous depth-wise batching + early exit, per threshold
    (e) the recursive model on the engine, lossless self-speculative decoding (loop-1 drafts, deeper loops verify)

Loads (LOADS): the same request list for every setup (prompt and output lengths drawn from ranges, prompts
cut from held-out text), greedy, outputs of fixed length (eos ignored, so every setup generates the same
tokens), a closed loop of `concurrency` clients: a client sends its next request when its previous one is
answered. The engine is driven in-process (no HTTP), so the numbers are the engine's, not Ray Serve's.

Quality, teacher-forced on held-out sequences with each setup's own exits: perplexity, next-token accuracy,
and top-1 agreement with the same model at full depth; plus, on the load's greedy outputs, the fraction of
tokens before the first divergence from the full-depth output. The step profile (`profile=True`) reruns
each engine setup once under rrt_ray.serve.profile.StepProfiler.
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
from rrt_ray.serve.exit_rules import EXIT_RULES, fit_exit_classifier
from rrt_ray.serve.profile import CATEGORIES, StepProfiler
from rrt_ray.serve.runner import WEIGHT_MODES
from rrt_ray.serve.sampling import SamplingParams
from rrt_ray.serve.speculative import DRAFT_SCHEDULES


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """A request mix: how many, how concurrent, prompt and output lengths (uniform ranges, inclusive)."""

    num_requests: int
    concurrency: int
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]


# "mixed" is prefill-heavy (prompt tokens run every loop: exits save at most a share of the decode rows);
# "decode-heavy" is what a chat or code-completion service sees, at 16 clients and at 1.
LOADS: dict[str, LoadSpec] = {
    "mixed": LoadSpec(48, 16, (16, 160), (16, 96)),
    "decode-heavy": LoadSpec(48, 16, (16, 64), (128, 256)),
    "decode-heavy-c1": LoadSpec(12, 1, (16, 64), (128, 256)),
}


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
    loads: tuple[str, ...] = ("mixed",)  # "mixed" is the four fields above; the others come from LOADS
    weights: str = "merged"  # weights of the (d) and (e) setups
    exit_rule: str = "confidence"  # exit rule of the (d) setups; "classifier" fits one on the request half
    draft_tokens: tuple[int, ...] = (4,)  # one (e) setup per value and schedule
    draft_schedules: tuple[str, ...] = ("constant", "heuristic")  # "e4" drafts 4 every round, "e4 adaptive" up to 4
    setups: tuple[str, ...] = ()  # setup keys to run ("c merged", "e4 adaptive", ...); empty: all
    profile: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.loads if name not in LOADS]
        if unknown or not self.loads:
            raise ValueError(f"unknown load(s) {unknown or self.loads}; allowed: {', '.join(LOADS)}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {self.weights!r}")
        if self.exit_rule not in EXIT_RULES:
            raise ValueError(f"exit_rule must be one of {', '.join(EXIT_RULES)}, got {self.exit_rule!r}")
        if any(k < 1 for k in self.draft_tokens):
            raise ValueError(f"draft_tokens must be >= 1, got {self.draft_tokens}")
        if not self.draft_schedules or any(s not in DRAFT_SCHEDULES for s in self.draft_schedules):
            raise ValueError(f"draft_schedules must be among {', '.join(DRAFT_SCHEDULES)}, got {self.draft_schedules}")
        known = [arm.key for arm in _arms(dataclasses.replace(self, setups=()))] if self.setups else []
        if any(key not in known for key in self.setups):
            raise ValueError(f"unknown setup(s) {[k for k in self.setups if k not in known]}; allowed: {', '.join(known)}")
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
    weight_bytes: int = 0
    steps: int = 0  # engine steps of the best round (0: not the engine)
    accepted: float = math.nan  # speculative: accepted drafts / drafted tokens
    profile: dict | None = None


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


def run_engine_load(
    engine: Engine, requests: list[Request], concurrency: int, threshold: float = 1.0, **params,
) -> tuple[float, list[float], list[list[int]], list[int]]:
    """Closed loop: wall seconds, per-request latencies, outputs, exit loops of every token.
    params: more SamplingParams fields (exit_mode, draft_tokens)."""
    pending = list(enumerate(requests))[::-1]
    started_at: dict[str, tuple[int, float]] = {}
    latencies = [0.0] * len(requests)
    outputs: list[list[int]] = [[] for _ in requests]
    loops: list[int] = []

    def submit() -> None:
        index, request = pending.pop()
        sampling = SamplingParams(max_tokens=request.max_tokens, ignore_eos=True, exit_threshold=threshold, **params)
        rid = engine.add_request(request.prompt, sampling, request_id=f"bench-{index}")
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


@dataclasses.dataclass(frozen=True)
class Arm:
    key: str
    name: str
    engine: str | None  # None: HF generate
    threshold: float = 1.0
    params: tuple[tuple[str, object], ...] = ()  # more SamplingParams fields


def _arms(cfg: ServeBenchConfig) -> list[Arm]:
    rule = "" if cfg.exit_rule == "confidence" else f", {cfg.exit_rule} rule"
    arms = [
        Arm("a", "original, HF generate (static batches)", None),
        Arm("b", "original, engine", "original"),
        Arm("c", "recursive, engine, no early exit", "lora"),
        Arm("c merged", "recursive, engine, no early exit, merged per-depth weights", "merged"),
    ]
    arms += [Arm(f"d{t}", f"recursive, CDB + early exit @ {t}{rule}, {cfg.weights}", "exit", t) for t in cfg.thresholds]
    arms += [
        Arm(f"e{k}", f"recursive, self-speculative, {k} drafts, {cfg.weights}", f"{cfg.weights} constant", 1.0, (("exit_mode", "speculative"), ("draft_tokens", k)))
        if schedule == "constant" else
        Arm(f"e{k} adaptive", f"recursive, self-speculative, up to {k} drafts (heuristic schedule), {cfg.weights}", cfg.weights, 1.0,
            (("exit_mode", "speculative"), ("draft_tokens", k)))
        for k in cfg.draft_tokens for schedule in cfg.draft_schedules
    ]
    return [arm for arm in arms if not cfg.setups or arm.key in cfg.setups]


def _load_models(cfg: ServeBenchConfig, log: Callable[[str], None]):
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rrt_ray  # noqa: F401
    from rrt_ray.convert import convert_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    recursive_dir = cfg.recursive
    if recursive_dir is None:
        recursive_dir = tempfile.mkdtemp(prefix="rrt-bench-serve-")
        convert_checkpoint(cfg.model, recursive_dir, loops=cfg.loops, init=cfg.init, lora_rank=cfg.lora_rank, progress=False, overwrite=True)
    return tokenizer, load, recursive_dir


def _engines(cfg: ServeBenchConfig, load, recursive_dir: str, max_len: int, classifier) -> dict[str, Engine]:
    def make(path, **extra):
        config = EngineConfig(
            max_num_seqs=max(max(LOADS[n].concurrency for n in cfg.loads), cfg.concurrency, cfg.eval_sequences),
            max_batch_tokens=cfg.max_batch_tokens, max_model_len=max_len, kv_fill=cfg.kv_fill, device="cpu", **extra,
        )
        return Engine(load(path), config=config, exit_classifier=classifier)

    engines = {"original": make(cfg.model), "lora": make(recursive_dir), "merged": make(recursive_dir, weights="merged")}
    engines["exit"] = engines[cfg.weights] if cfg.exit_rule == "confidence" else make(recursive_dir, weights=cfg.weights, exit_rule=cfg.exit_rule)
    if "constant" in cfg.draft_schedules:  # the others use the engine default, the heuristic schedule
        engines[f"{cfg.weights} constant"] = make(recursive_dir, weights=cfg.weights, draft_schedule="constant")
    return engines


def _run_arm(arm: Arm, engines: dict[str, Engine], original, requests: list[Request], concurrency: int, pad_id: int):
    if arm.engine is None:
        wall, latencies, outputs = run_static_load(original, requests, concurrency, pad_id)
        return wall, latencies, outputs, [1] * sum(r.max_tokens for r in requests), {}
    engine = engines[arm.engine]
    before = dict(engine.stats)
    wall, latencies, outputs, loops = run_engine_load(engine, requests, concurrency, arm.threshold, **dict(arm.params))
    return wall, latencies, outputs, loops, {k: engine.stats[k] - before[k] for k in engine.stats}


def run_load(
    cfg: ServeBenchConfig, load_name: str, arms: list[Arm], engines: dict[str, Engine], original, requests: list[Request],
    pad_id: int, log: Callable[[str], None],
) -> dict[str, dict]:
    """Every arm on one request list: `repeats` interleaved rounds, the best wall time kept; then a profile."""
    concurrency = LOADS[load_name].concurrency if load_name != "mixed" else cfg.concurrency
    total_tokens = sum(r.max_tokens for r in requests)
    measured: dict[str, dict] = {}
    for round_ in range(cfg.repeats):
        for arm in arms:
            wall, latencies, outputs, loops, stats = _run_arm(arm, engines, original, requests, concurrency, pad_id)
            best = measured.setdefault(arm.key, {"walls": []})
            best["walls"].append(wall)
            if "wall" not in best or wall < best["wall"]:
                best.update(wall=wall, latencies=latencies, outputs=outputs, loops=loops, stats=stats)
            log(f"{load_name} round {round_ + 1}: {arm.key:9s} {total_tokens / wall:8.1f} tok/s  ({arm.name})")
    if cfg.profile:
        for arm in arms:
            if arm.engine is None:
                continue
            profiler = StepProfiler(engines[arm.engine])
            try:
                wall, *_ = _run_arm(arm, engines, original, requests, concurrency, pad_id)
            finally:
                profiler.close()
            measured[arm.key]["profile"] = {**profiler.report(), "wall_s": wall, "tokens": total_tokens}
            log(f"{load_name} profile: {arm.key:9s} {total_tokens / wall:8.1f} tok/s under the profiler")
    return measured


def run_benchmark(cfg: ServeBenchConfig, log: Callable[[str], None] = print) -> tuple[dict[str, list[ArmResult]], dict]:
    """Every load of cfg.loads through every setup. Returns ({load: [ArmResult]}, info)."""
    torch.set_num_threads(cfg.torch_threads)
    tokenizer, load, recursive_dir = _load_models(cfg, log)
    original, recursive = load(cfg.model), load(recursive_dir)
    stream = token_stream(tokenizer)
    workloads = {}
    for name in cfg.loads:
        spec = LOADS[name]
        load_cfg = cfg if name == "mixed" else dataclasses.replace(
            cfg, num_requests=spec.num_requests, concurrency=spec.concurrency, prompt_tokens=spec.prompt_tokens, output_tokens=spec.output_tokens,
        )
        workloads[name] = make_workload(load_cfg, stream)
    evals = workloads[cfg.loads[0]][1]
    max_len = max(max(len(r.prompt) + r.max_tokens for r in w[0]) for w in workloads.values())
    max_len = max(max_len, len(evals[0])) + 1
    classifier = None
    if cfg.exit_rule == "classifier":  # fitted on the request half of the stream, never on the eval half
        half = len(stream) // 2
        rng = random.Random(cfg.seed + 1)
        starts = [rng.randrange(0, half - 129) for _ in range(32)]
        classifier = fit_exit_classifier(recursive, [stream[s : s + 128] for s in starts])
    engines = _engines(cfg, load, recursive_dir, max_len, classifier)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    arms = _arms(cfg)
    log(f"loads {', '.join(cfg.loads)}; recursive model {recursive_dir}")
    for engine in engines.values():  # warm-up: first calls allocate
        run_engine_load(engine, workloads[cfg.loads[0]][0][:2], 2, 0.5)
    quality = _quality(cfg, arms, engines, original, evals)
    by_load, info = {}, {"recursive": recursive_dir, "loads": {}, "quality": quality}
    weight_bytes = {k: e.runner.weight_bytes() for k, e in engines.items()}
    hf_bytes = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in original.parameters()}.values())
    for name in cfg.loads:
        requests = workloads[name][0]
        total_tokens = sum(r.max_tokens for r in requests)
        measured = run_load(cfg, name, arms, engines, original, requests, pad_id, log)
        results = []
        for arm in arms:
            m = measured[arm.key]
            stats = m["stats"]
            # full depth of the same weights: (a) for the original, (c) (or (c merged), the same tokens) for the rest
            refs = ("a",) if arm.engine in (None, "original") else ("c", "c merged")
            reference = next((measured[k]["outputs"] for k in refs if k in measured), None)
            q = quality[arm.key]
            results.append(ArmResult(
                name=f"({arm.key}) {arm.name}", tokens_per_s=total_tokens / m["wall"],
                p50_s=_percentile(m["latencies"], 0.5), p99_s=_percentile(m["latencies"], 0.99),
                mean_exit_loops=statistics.fmean(m["loops"]) if arm.engine not in (None, "original") else float("nan"),
                perplexity=q["perplexity"], accuracy=q["accuracy"], agreement=q["agreement"],
                prefix_match=math.nan if reference is None else _prefix_match(m["outputs"], reference), outputs=m["outputs"], walls=m["walls"],
                weight_bytes=hf_bytes if arm.engine is None else weight_bytes[arm.engine], steps=stats.get("steps", 0),
                accepted=stats["accepted_drafts"] / stats["drafted_tokens"] if stats.get("drafted_tokens") else math.nan,
                profile=m.get("profile"),
            ))
        by_load[name] = results
        spec = LOADS[name] if name != "mixed" else LoadSpec(cfg.num_requests, cfg.concurrency, cfg.prompt_tokens, cfg.output_tokens)
        info["loads"][name] = {"requests": len(requests), "output_tokens": total_tokens, "spec": spec}
    info["params"] = {"original": sum(p.numel() for p in original.parameters()), "recursive": sum(p.numel() for p in recursive.parameters())}
    return by_load, info


def _quality(cfg: ServeBenchConfig, arms: list[Arm], engines: dict[str, Engine], original, evals: list[list[int]]) -> dict[str, dict]:
    """Teacher-forced held-out quality of every arm (speculative arms score as full depth: they are lossless)."""
    p = cfg.eval_prompt_tokens
    targets = [t for seq in evals for t in seq[p:]]
    hf_logprobs, hf_argmax = score_hf(original, evals, p)
    full_depth = score_engine(engines["lora"], evals, p, 1.0)[1]
    out = {}
    for arm in arms:
        if arm.engine is None:
            logprobs, argmax = hf_logprobs, hf_argmax
        else:
            threshold = 1.0 if dict(arm.params).get("exit_mode") == "speculative" else arm.threshold
            logprobs, argmax, _ = score_engine(engines[arm.engine], evals, p, threshold)
        reference = hf_argmax if arm.engine in (None, "original") else full_depth
        out[arm.key] = {
            "perplexity": math.exp(-statistics.fmean(logprobs)),
            "accuracy": statistics.fmean(float(a == t) for a, t in zip(argmax, targets)),
            "agreement": statistics.fmean(float(a == r) for a, r in zip(argmax, reference)),
        }
    return out


def _rate(tokens_per_s: float) -> str:
    # Three significant figures: a 135M model on CPU decodes at single-digit tokens/s, the demo pair at ~100.
    return f"{tokens_per_s:.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"


def _percent(share: float) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.1f}%"


def load_table(results: list[ArmResult], output_tokens: int) -> list[str]:
    """One load's table: throughput, memory, latency, exits, quality (markdown lines)."""
    base = results[0]  # (a) unless --setups leaves it out
    lines = [
        f"| setup | tokens/s | vs {base.name.split(')')[0]}) | weights MB | steps | p50 latency s | p99 latency s | mean exit loops | drafts kept | held-out ppl | next-token acc | agreement | prefix match |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        loops = "-" if math.isnan(r.mean_exit_loops) else f"{r.mean_exit_loops:.2f}"
        kept = "-" if math.isnan(r.accepted) else f"{100 * r.accepted:.0f}%"
        lines.append(
            f"| {r.name} | {_rate(r.tokens_per_s)} | {r.tokens_per_s / base.tokens_per_s:.2f}x | {r.weight_bytes / 1e6:.1f} | {r.steps or '-'} | "
            f"{r.p50_s:.2f} | {r.p99_s:.2f} | {loops} | {kept} | {r.perplexity:.2f} | {100 * r.accuracy:.1f}% | {100 * r.agreement:.1f}% | "
            f"{_percent(r.prefix_match)} |"
        )
    lines += ["", "Every round's tokens/s: " + "; ".join(f"{r.name.split(')')[0]}) " + ", ".join(_rate(output_tokens / w) for w in r.walls) for r in results) + "."]
    return lines


def profile_table(results: list[ArmResult]) -> list[str]:
    """ms per engine step in each category (share of the profiled wall), and the bound without Python."""
    lines = [
        "| setup | steps | rows/step | ms/step | " + " | ".join(CATEGORIES) + " | tokens/s profiled | bound: tokens/s if only tensor work remained |",
        "|---|---:|---:|---:|" + "---:|" * len(CATEGORIES) + "---:|---:|",
    ]
    for r in results:
        prof = r.profile
        if prof is None:
            continue
        steps, total = max(prof["steps"], 1), prof["total_s"] or 1.0
        cells = [f"{1e3 * prof['seconds'][c] / steps:.2f} ({100 * prof['seconds'][c] / total:.0f}%)" for c in CATEGORIES]
        tensor_work = sum(prof["seconds"][c] for c in ("matmul", "lora", "norms", "attention", "exit", "kv_fill"))
        lines.append(
            f"| {r.name.split(')')[0]}) | {prof['steps']} | {prof['rows'] / steps:.1f} | {1e3 * total / steps:.2f} | " + " | ".join(cells)
            + f" | {prof['tokens'] / prof['wall_s']:.0f} | {prof['tokens'] / tensor_work:.0f} |"
        )
    return lines


def write_report(
    cfg: ServeBenchConfig, by_load: dict[str, list[ArmResult]], info: dict, out_md: Path, out_png: Path | None, machine: str,
    command: str | None = None, notes: str = "",
) -> None:
    """The results file (and the PNG of the first load); `command` is the exact command line."""
    lines = [
        "# Serving benchmark: static batching vs continuous batching vs depth-wise batching, early exit, self-speculative decoding",
        "",
        f"`{command or f'python jobs/bench_serve.py --model {cfg.model}'}` ({machine}).",
        "",
        f"Models: original {info['params']['original'] / 1e6:.2f}M parameters; recursive ({info['recursive']}) "
        f"{info['params']['recursive'] / 1e6:.2f}M. Weights MB: every parameter (tied ones once) plus merged per-depth weights.",
        f"Every load: the same request list for every setup, greedy, eos ignored (every setup generates the same number of tokens), "
        f"a closed loop of concurrent clients; the engine in-process (no HTTP); best of {cfg.repeats} interleaved rounds; fp32, "
        f"{cfg.torch_threads} torch thread(s). Quality: teacher-forced on {cfg.eval_sequences} held-out sequences "
        f"({cfg.eval_prompt_tokens}-token prefix, {cfg.eval_tokens} scored tokens) with each setup's own exits; agreement = top-1 "
        "agreement with the same model at full depth; prefix match = share of the load's greedy output tokens before the first "
        "divergence from the full-depth output ((a) for (b), (c) for the recursive setups); drafts kept = accepted / drafted.",
    ]
    if notes:
        lines += ["", notes]
    for name, results in by_load.items():
        load = info["loads"][name]
        spec = load["spec"]
        lines += [
            "", f"## Load `{name}`: {load['requests']} requests, prompts {spec.prompt_tokens[0]}-{spec.prompt_tokens[1]} tokens, "
            f"outputs {spec.output_tokens[0]}-{spec.output_tokens[1]} ({load['output_tokens']} output tokens), concurrency {spec.concurrency}", "",
        ]
        lines += load_table(results, load["output_tokens"])
        if any(r.profile for r in results):
            lines += ["", f"Step profile (`{name}`, one more run of each engine setup under the profiler):", ""]
            lines += profile_table(results)
    if out_png is not None:
        lines += ["", f"![throughput vs quality]({out_png.name})"]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    if out_png is not None:
        _plot(next(iter(by_load.values())), out_png)


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
