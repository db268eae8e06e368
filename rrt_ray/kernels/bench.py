"""Timing grid for the multi-LoRA paths, behind jobs/bench_lora.py.

Serving-like calls: T tokens of one continuous depth-wise batch, each at a uniformly random depth in
[0, D), one LoRA of rank r on a d x d projection, forward only (serving does no backward; training
uses an int depth, i.e. two plain matmuls). Every arm gets the same inputs. The machines are shared
and neighbours' jobs stretch single calls 10-100x, so arms are interleaved round by round and each
keeps its fastest call: the least disturbed estimate of what the code itself costs (as timeit does).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from rrt_ray.kernels import torch_ops

Arm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

BASELINE = "naive_loop"
FLOOR = "one_depth"  # all tokens at one depth: a yardstick, not a contender
# The same tokens ordered by depth, as the serving engine sends them: segmented's slice path (no sort,
# gather or scatter). A yardstick too: its input differs, so it does not compete.
GROUPED = "segmented_grouped"
YARDSTICKS = (FLOOR, GROUPED)
# Gathering A and B per token materialises T * r * (d_in + d_out) weights; past this it only thrashes.
GATHER_LIMIT_BYTES = 256 * 2**20


@dataclass(frozen=True)
class BenchCase:
    num_tokens: int
    num_depths: int
    rank: int
    d_model: int


def grid(tokens: list[int], depths: list[int], ranks: list[int], d_model: int) -> list[BenchCase]:
    return [BenchCase(t, d, r, d_model) for d in depths for r in ranks for t in tokens]


def _one_depth(x, lora_a, lora_b, depth_index, scale):
    """The lower bound: the same tokens all at depth 0, i.e. the int fast path (two matmuls)."""
    return ((x @ lora_a[0].T) * scale) @ lora_b[0].T


def cpu_arms() -> dict[str, Arm]:
    return {
        BASELINE: torch_ops.multi_lora_reference,  # boolean-mask loop over depths
        "segmented": torch_ops.multi_lora_segmented,
        "gather_bmm": torch_ops.multi_lora_gather_bmm,
        "masked": torch_ops.multi_lora_masked,
        FLOOR: _one_depth,
        GROUPED: torch_ops.multi_lora_segmented,
    }


def cuda_arms() -> dict[str, Arm]:
    from rrt_ray.kernels.multi_lora import multi_lora

    return {
        BASELINE: torch_ops.multi_lora_reference,
        "torch_segmented": torch_ops.multi_lora_segmented,
        "triton": lambda x, a, b, idx, s: multi_lora(x, a, b, idx, s, backend="triton"),
        FLOOR: _one_depth,
    }


def _skip(name: str, case: BenchCase, dtype: torch.dtype) -> bool:
    gathered = case.num_tokens * case.rank * 2 * case.d_model * dtype.itemsize
    return name == "gather_bmm" and gathered > GATHER_LIMIT_BYTES


def _best_time(fn: Callable[[], object], sync: Callable[[], None], budget_s: float, min_iters: int) -> float:
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or (time.perf_counter() - start < budget_s and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def run_case(
    case: BenchCase,
    arms: dict[str, Arm],
    device: torch.device,
    dtype: torch.dtype,
    rounds: int = 3,
    budget_s: float = 0.03,
) -> dict[str, float | None]:
    """Microseconds per call for every arm (None: skipped), fastest call over `rounds` interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    d = case.d_model
    x = torch.randn(case.num_tokens, d, generator=gen).to(device, dtype)  # (T, d)
    lora_a = (torch.randn(case.num_depths, case.rank, d, generator=gen) / d**0.5).to(device, dtype)  # (D, r, d)
    lora_b = (torch.randn(case.num_depths, d, case.rank, generator=gen) / case.rank**0.5).to(device, dtype)  # (D, d, r)
    depth_index = torch.randint(0, case.num_depths, (case.num_tokens,), generator=gen).to(device)  # (T,)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    live = {name: arm for name, arm in arms.items() if not _skip(name, case, dtype)}
    best: dict[str, float] = {}
    grouped_index = torch.sort(depth_index).values  # (T,) the same depths, rows ordered by depth
    index_of = {name: grouped_index if name == GROUPED else depth_index for name in live}
    for name, arm in live.items():  # warm up (and compile, for Triton)
        arm(x, lora_a, lora_b, index_of[name], 0.5)
    sync()
    for _ in range(rounds):
        for name, arm in live.items():
            idx = index_of[name]
            t = _best_time(lambda: arm(x, lora_a, lora_b, idx, 0.5), sync, budget_s, min_iters=2)
            best[name] = min(best.get(name, float("inf")), t * 1e6)
    return {name: best.get(name) for name in arms}


def run_grid(
    cases: list[BenchCase],
    arms: dict[str, Arm],
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    passes: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, float | None]]:
    """run_case over the grid `passes` times, keeping each cell's fastest: a neighbour's burst that
    spans all rounds of one case rarely comes back for the same case a pass later."""
    results: list[dict[str, float | None]] = [{} for _ in cases]
    for p in range(passes):
        for i, case in enumerate(cases):
            res = run_case(case, arms, device, dtype, rounds)
            results[i] = {k: v if results[i].get(k) is None else min(v, results[i][k]) for k, v in res.items()}
            timed = ", ".join(f"{k}={v:.0f}us" for k, v in res.items() if v)
            log(f"[pass {p + 1}/{passes}, {i + 1}/{len(cases)}] {case}: {timed}")
    return results


def format_table(cases: list[BenchCase], results: list[dict[str, float | None]]) -> str:
    """Markdown: microseconds per call and, in brackets, the speedup over the naive per-depth loop."""
    names = list(results[0])
    contenders = [n for n in names if n not in YARDSTICKS]
    head = ["T", "D", "r"] + [f"{n} us" for n in names] + ["fastest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, res in zip(cases, results):
        base = res[BASELINE]
        cells = [str(case.num_tokens), str(case.num_depths), str(case.rank)]
        for name in names:
            t = res[name]
            cells.append("skipped" if t is None else f"{t:.0f} ({base / t:.2f}x)")
        timed = [n for n in contenders if res[n] is not None]
        cells.append(min(timed, key=lambda n: res[n]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(cases: list[BenchCase], results: list[dict[str, float | None]]) -> str:
    """Per contender: how often it was fastest, and its geometric-mean speedup over the naive loop."""
    names = [n for n in results[0] if n not in YARDSTICKS]
    lines = []
    for name in names:
        ratios = [res[BASELINE] / res[name] for res in results if res[name] is not None]
        wins = sum(1 for res in results if min((n for n in names if res[n] is not None), key=res.get) == name)
        geo = statistics.geometric_mean(ratios) if ratios else float("nan")
        lines.append(
            f"- {name}: fastest in {wins}/{len(cases)} cases; geometric-mean speedup over the naive loop "
            f"{geo:.2f}x over the {len(ratios)} cases it ran"
        )
    return "\n".join(lines)


def machine_line(device: torch.device) -> str:
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs (nproc), torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"python {platform.python_version()}{gpu}; load average {load} at the start (the machine is shared)"
    )


def write_report(
    path: str, command: str, machine: str, device: torch.device, dtype: torch.dtype, table: str, summary: str,
    notes: str, elapsed_s: float,
) -> None:  # fmt: skip
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run = f"whole run {elapsed_s:.0f} s, load average {os.getloadavg()[0]:.1f} at the end"
    text = (
        f"# Multi-LoRA benchmark ({device.type}, {str(dtype).removeprefix('torch.')})\n\n"
        f"Command: `{command}`\n\nMachine: {machine}\n\nDate: {date}; {run}.\n\n"
        f"{notes}\n\n## Summary\n\n{summary}\n\n## Results\n\n{table}\n"
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_json(path: str, cases: list[BenchCase], results: list[dict[str, float | None]], meta: dict) -> None:
    rows = [{**asdict(c), "us": r} for c, r in zip(cases, results)]
    with open(path, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
