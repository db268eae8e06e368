"""Benchmark the multi-LoRA paths at serving-like shapes and write results/bench_lora.md.

CPU: the torch strategies against each other and against the naive per-depth python loop (fp32).
CUDA: the Triton kernels against the torch reference and the segmented torch strategy.

    python jobs/bench_lora.py                      # CPU grid, ~2 minutes on 2 cores
    python jobs/bench_lora.py --device cuda --dtype bfloat16 --out results/bench_lora_cuda.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from rrt_ray.kernels import bench

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

NOTES = """Each cell: microseconds per forward call (the fastest call of {rounds} interleaved rounds in each
of {passes} passes over the grid) and, in brackets, the speedup over `naive_loop`
(torch_ops.multi_lora_reference: a boolean mask and a gather per depth).
Tokens are spread uniformly over the D depths. `one_depth` is not a contender: the same tokens all at
one depth (the int fast path, two matmuls), i.e. the floor that per-token depths cost against.
`segmented_grouped` is not a contender either: `segmented` on the same tokens ordered by depth, as
the serving engine orders its rows, which turns each depth into a slice (no sort, gather or scatter).
`gather_bmm` is skipped where the per-token weight copies would pass 256 MiB."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="keep fp32 on CPU: bf16 is ~600x slower")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case; each arm keeps its best")
    p.add_argument("--passes", type=int, default=2, help="passes over the whole grid; each cell keeps its best")
    p.add_argument("--out", default="results/bench_lora.md")
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    arms = bench.cuda_arms() if device.type == "cuda" else bench.cpu_arms()
    cases = bench.grid(args.tokens, args.depths, args.ranks, args.d_model)
    machine, start = bench.machine_line(device), time.perf_counter()
    results = bench.run_grid(cases, arms, device, dtype, args.rounds, args.passes, log=lambda s: print(s, flush=True))
    elapsed = time.perf_counter() - start
    table, summary = bench.format_table(cases, results), bench.summarize(cases, results)
    print(f"\n{table}\n\n{summary}\n")
    command = "python " + shlex.join(["jobs/bench_lora.py", *(sys.argv[1:] if argv is None else argv)])
    grid = f"T in {args.tokens}, D in {args.depths}, r in {args.ranks}, d = {args.d_model} (d_in = d_out)"
    notes = f"{NOTES.format(rounds=args.rounds, passes=args.passes)}\nGrid: {grid}."
    bench.write_report(args.out, command, machine, device, dtype, table, summary, notes, elapsed)
    if args.json:
        bench.write_json(args.json, cases, results, {"command": command, "machine": machine})
    print(f"wrote {args.out} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
