"""Serving benchmark: HF static batching vs the engine vs depth-wise batching with early exit.

    python jobs/bench_serve.py --model DIR [--recursive DIR] [--thresholds 0.9,0.7,0.5] [--concurrency 16]

DIR is the original model (with its tokenizer), e.g. the demo teacher from jobs/pretrain.py. Without
--recursive, a recursive model is converted from it here (--loops, --lora-rank, --init). Writes
results/bench_serve.md and results/bench_serve.png (throughput vs quality). See rrt_ray/serve/bench.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for a plain checkout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--recursive", default=None)
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--init", default="average")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--thresholds", default="0.9,0.7,0.5,0.3,0.1")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-fill", default="propagate", choices=("propagate", "share"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/bench_serve.md")
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rrt_ray.serve.bench import ServeBenchConfig, run_benchmark, write_report

    try:
        cfg = ServeBenchConfig(
            model=args.model, recursive=args.recursive, loops=args.loops, lora_rank=args.lora_rank, init=args.init,
            num_requests=args.num_requests, concurrency=args.concurrency, repeats=args.repeats, kv_fill=args.kv_fill,
            thresholds=tuple(float(t) for t in args.thresholds.split(",") if t), torch_threads=args.threads,
        )
    except ValueError as err:
        print(f"bench_serve: error: {err}", file=sys.stderr)
        return 2
    results, info = run_benchmark(cfg, log=lambda line: print(f"bench_serve: {line}", flush=True))
    out = Path(args.out)
    png = None if args.no_png else out.with_suffix(".png")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}"
    write_report(cfg, results, info, out, png, machine)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
