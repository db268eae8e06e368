"""Quality study on a real checkpoint: every conversion arm of issue 11 (5a) through the real converter.

    python jobs/bench_quality.py --teacher out/models/smollm2-135m            # resumable: rerun to continue
    python jobs/bench_quality.py --teacher out/models/smollm2-135m --arms avg-r64,avg-r64-calib --rerun

Rows go to results/quality_smollm2.jsonl as each arm finishes; results/quality_smollm2.md and .png are
rewritten from all rows after every arm. Seeded: conversions and calibration draws are deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import rrt_ray  # noqa: F401
from rrt_ray import quality


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="out/models/smollm2-135m", help="the original model (a directory or .gguf; `rrt fetch smollm2-135m`)")
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: all, in order)")
    parser.add_argument("--windows", type=int, default=16, help="held-out 256-token windows per perplexity (default 16)")
    parser.add_argument("--results", default="results/quality_smollm2", help="results path without suffix")
    parser.add_argument("--workdir", default="out/quality", help="converted models (deleted after each arm)")
    parser.add_argument("--rerun", action="store_true", help="rerun the named arms even if they have rows")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new arms after this long")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the rows; run nothing")
    args = parser.parse_args(argv)
    arms = quality.conversion_arms()
    names = [a.name for a in arms]
    if args.arms:
        wanted = args.arms.split(",")
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"bench_quality: error: unknown arm {unknown[0]!r}; allowed: {', '.join(names)}", file=sys.stderr)
            return 2
        arms = [a for a in arms if a.name in wanted]
    if args.windows < 1:
        print(f"bench_quality: error: --windows must be >= 1, got {args.windows}", file=sys.stderr)
        return 2
    if args.report_only:
        _report(quality.read_rows(Path(args.results + ".jsonl")), args, argv)
        return 0
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoTokenizer

    from rrt_ray.convert.gguf_import import resolve_model_path

    try:
        teacher = resolve_model_path(args.teacher, log=print)
        windows = quality.heldout_windows(AutoTokenizer.from_pretrained(teacher), args.windows)
    except (ValueError, OSError) as err:
        print(f"bench_quality: error: {err}", file=sys.stderr)
        return 2
    jsonl = Path(args.results + ".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    rows = quality.read_rows(jsonl)
    started = time.perf_counter()
    for arm in arms:
        done = [r for r in rows if r["key"] == arm.key and r["windows"] == args.windows]
        if done and not args.rerun:
            print(f"{arm.name}: ppl {done[-1]['ppl']:.4g} (from {jsonl})")
            continue
        if args.max_minutes is not None and time.perf_counter() - started > args.max_minutes * 60:
            print(f"stopping before {arm.name}: --max-minutes {args.max_minutes} reached (rerun to continue)")
            break
        row = quality.run_arm(arm, teacher, windows, Path(args.workdir))
        rows = [r for r in rows if not (r["key"] == arm.key and r["windows"] == args.windows)] + [row]
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{arm.name}: ppl {row['ppl']:.4g}, {row['params']:,} params, convert {row['convert_s']}s, eval {row['eval_s']}s", flush=True)
        _report(rows, args, argv)
    return 0


def _report(rows: list[dict], args: argparse.Namespace, argv: list[str] | None) -> None:
    load = os.getloadavg()[0]  # perplexities do not depend on it; the convert/eval seconds do
    machine = f"{platform.node()}, {os.cpu_count()} cores (load average {load:.1f} when written), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python jobs/bench_quality.py " + " ".join(flags)
    order = {a.name: i for i, a in enumerate(quality.conversion_arms())}
    table = sorted((r for r in rows if r["windows"] == args.windows), key=lambda r: order.get(r["arm"], 99))
    quality.write_report(table, Path(args.results + ".md"), Path(args.results + ".png"), command, machine)


if __name__ == "__main__":
    sys.exit(main())
