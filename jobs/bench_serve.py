"""Serving benchmark: HF static batching vs the engine vs depth-wise batching, early exit, speculative decoding.

    python jobs/bench_serve.py --model DIR [--recursive DIR] [--loads mixed,decode-heavy] [--profile]

DIR is the original model (with its tokenizer), e.g. the demo teacher from jobs/pretrain.py. Without
--recursive, a recursive model is converted from it here (--loops, --lora-rank, --init). Writes
results/bench_serve.md and results/bench_serve.png (throughput vs quality). See rrt_ray/serve/bench.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path



def _numbers(flag: str, text: str, kind=float) -> tuple:
    try:
        return tuple(kind(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the original Hugging Face model directory (with its tokenizer)")
    parser.add_argument("--recursive", default=None, help="a converted (ideally early-exit trained) recursive model; default: convert --model here")
    parser.add_argument("--loops", type=int, default=2, help="loops of the model converted here (without --recursive)")
    parser.add_argument("--lora-rank", type=int, default=64, help="LoRA rank of the model converted here")
    parser.add_argument("--init", default="average", help="init strategy of the model converted here: stepwise, average or lower")
    parser.add_argument("--loads", default="mixed", help="comma-separated loads: mixed, decode-heavy, decode-heavy-c1")
    parser.add_argument("--num-requests", type=int, default=48, help="requests in the mixed load (the same list for every setup)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop concurrent clients of the mixed load")
    parser.add_argument("--thresholds", default="0.9,0.7,0.5,0.3,0.1", help="comma-separated exit thresholds in [0, 1) for the (d) setups")
    parser.add_argument("--exit-rule", default="confidence", help="exit rule of the (d) setups: confidence or classifier")
    parser.add_argument("--weights", default="merged", help="weights of the (d) and (e) setups: lora or merged")
    parser.add_argument("--draft-tokens", default="4", help="comma-separated draft lengths, one (e) setup each per schedule")
    parser.add_argument("--draft-schedules", default="constant,heuristic", help="comma-separated (e) draft schedules: constant (setup eK) and heuristic (setup 'eK adaptive')")
    parser.add_argument("--setups", default="", help="comma-separated setup keys to run, e.g. 'c merged,e4 adaptive' (default: all)")
    parser.add_argument("--profile", action="store_true", help="rerun each engine setup once under the step profiler")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds per setup; each keeps its best")
    parser.add_argument("--kv-fill", default="propagate", choices=("propagate", "share"), help="how exited tokens fill deeper loops' keys/values")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--notes", default="", help="a paragraph written under the header (e.g. the machine's state)")
    parser.add_argument("--out", default="results/bench_serve.md", help="results file (a PNG is written beside it)")
    parser.add_argument("--no-png", action="store_true", help="skip the throughput-vs-quality plot")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rrt_ray.serve.bench import ServeBenchConfig, run_benchmark, write_report

    try:
        for flag, path in (("--model", args.model), ("--recursive", args.recursive)):
            if path is not None and not (Path(path) / "config.json").is_file():
                raise ValueError(f"{flag} {path!r} is not a Hugging Face model directory (no config.json)")
        cfg = ServeBenchConfig(
            model=args.model, recursive=args.recursive, loops=args.loops, lora_rank=args.lora_rank, init=args.init,
            num_requests=args.num_requests, concurrency=args.concurrency, repeats=args.repeats, kv_fill=args.kv_fill,
            thresholds=_numbers("--thresholds", args.thresholds), torch_threads=args.threads,
            loads=_names(args.loads), weights=args.weights, exit_rule=args.exit_rule,
            draft_tokens=_numbers("--draft-tokens", args.draft_tokens, int), profile=args.profile,
            draft_schedules=_names(args.draft_schedules), setups=_names(args.setups),
        )
    except ValueError as err:
        print(f"bench_serve: error: {err}", file=sys.stderr)
        return 2
    by_load, info = run_benchmark(cfg, log=lambda line: print(f"bench_serve: {line}", flush=True))
    out = Path(args.out)
    png = None if args.no_png else out.with_suffix(".png")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}"
    command = shlex.join(["python", "jobs/bench_serve.py", *(sys.argv[1:] if argv is None else argv)])
    write_report(cfg, by_load, info, out, png, machine, command, notes=args.notes)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
