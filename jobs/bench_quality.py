"""Quality study on a real checkpoint (issue 11, 5a-5c): every conversion arm through the real converter, the
uptraining arms (the same budget each) and early-exit post-training of the best through the real job.

    python jobs/bench_quality.py --teacher out/models/smollm2-135m            # resumable: rerun to continue
    python jobs/bench_quality.py --teacher out/models/smollm2-135m --groups uptrain,early-exit
    python jobs/bench_quality.py --teacher out/models/smollm2-135m --arms avg-r64,avg-r64-calib --rerun
    python jobs/bench_quality.py --teacher out/models/smollm2-135m --reproduce avg-r64,stepwise-r0,mc-avg-r64

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
from rrt_ray import quality, quality_uptrain

GROUPS = ("conversion", "uptrain", "early-exit")
REPRODUCE_TOLERANCE = 0.02  # the issue's: a rerun arm's perplexity within 2% of its row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="out/models/smollm2-135m", help="the original model (a directory or .gguf; `rrt fetch smollm2-135m`)")
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: every arm of --groups, in order)")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, from: {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--reproduce", default=None, help="comma-separated arms to rerun and compare with their rows (2%% tolerance)")
    parser.add_argument("--windows", type=int, default=16, help="held-out 256-token windows per perplexity (default 16)")
    parser.add_argument("--results", default="results/quality_smollm2", help="results path without suffix")
    parser.add_argument("--workdir", default="out/quality", help="converted models (deleted after each arm)")
    parser.add_argument("--rerun", action="store_true", help="rerun the named arms even if they have rows")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new arms after this long")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the rows; run nothing")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if not groups or any(g not in GROUPS for g in groups):
        print(f"bench_quality: error: --groups {args.groups!r}: allowed: {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    arms = _arms(groups)
    names = [a.name for a in _arms(GROUPS)]
    wanted = (args.arms or args.reproduce or "").split(",") if (args.arms or args.reproduce) else None
    if wanted:
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"bench_quality: error: unknown arm {unknown[0]!r}; allowed: {', '.join(names)}", file=sys.stderr)
            return 2
        arms = [a for a in _arms(GROUPS) if a.name in wanted]
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
    if args.reproduce:
        return _reproduce(arms, rows, teacher, windows, args)
    if any(not isinstance(a, quality.Arm) for a in arms):  # training arms report accuracy: so does the teacher
        rows = _teacher_accuracy(rows, teacher, jsonl, args.windows)
    started = time.perf_counter()
    for arm in arms:
        done = [r for r in rows if r["key"] == arm.key and r["windows"] == args.windows]
        if done and not args.rerun:
            print(f"{arm.name}: ppl {done[-1]['ppl']:.4g} (from {jsonl})")
            continue
        if args.max_minutes is not None and time.perf_counter() - started > args.max_minutes * 60:
            print(f"stopping before {arm.name}: --max-minutes {args.max_minutes} reached (rerun to continue)")
            break
        row = _run(arm, teacher, windows, args, rows)
        if row is None:
            continue
        rows = [r for r in rows if not (r["key"] == arm.key and r["windows"] == args.windows)] + [row]
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{arm.name}: ppl {row['ppl']:.4g}, {row['params']:,} params", flush=True)
        _report(rows, args, argv)
    return 0


def _teacher_accuracy(rows: list[dict], teacher: str, jsonl: Path, windows: int) -> list[dict]:
    """The original's row with its `rrt eval` accuracy (added once, appended as the row's new version)."""
    from rrt_ray import lm_eval_task

    original = next((r for r in rows if r["arm"] == "original" and r["windows"] == windows), None)
    if original is None or "acc" in original:
        return rows
    original = {**original, "acc": lm_eval_task.evaluate(teacher, num_docs=quality_uptrain.EVAL_DOCS)["acc"]}
    with open(jsonl, "a") as f:
        f.write(json.dumps(original) + "\n")
    print(f"original: lm-eval next-line accuracy {original['acc']:.1%}", flush=True)
    return [r for r in rows if r is not original and not (r["arm"] == "original" and r["windows"] == windows)] + [original]


def _arms(groups) -> list:
    """The arms of the groups, in run order; the early-exit arm is a placeholder until the uptraining arms ran."""
    arms = list(quality.conversion_arms()) if "conversion" in groups else []
    arms += quality_uptrain.uptrain_arms() if "uptrain" in groups else []
    arms += [quality_uptrain.EARLY_EXIT_PLACEHOLDER] if "early-exit" in groups else []
    return arms


def _run(arm, teacher: str, windows, args: argparse.Namespace, rows: list[dict]) -> dict | None:
    if isinstance(arm, quality.Arm):
        return quality.run_arm(arm, teacher, windows, Path(args.workdir))
    if arm is quality_uptrain.EARLY_EXIT_PLACEHOLDER:
        trained = [r for r in rows if r["group"] == "uptrain" and r["windows"] == args.windows]
        if not trained:
            print("early exit: skipped: no uptraining arm has a row yet (run --groups uptrain first)")
            return None
        arm = quality_uptrain.early_exit_arm(min(trained, key=lambda r: r["ppl"])["arm"])
        if any(r["key"] == arm.key and r["windows"] == args.windows for r in rows) and not args.rerun:
            return None
    print(f"{arm.name}: training (log: {Path(args.workdir) / (arm.name + '.log')})", flush=True)
    return quality_uptrain.run_train_arm(arm, teacher, windows, Path(args.workdir), rows)


def _reproduce(arms, rows: list[dict], teacher: str, windows, args: argparse.Namespace) -> int:
    """Rerun the arms into a scratch directory (the table is not touched); exit 1 unless each is within 2%."""
    failed, lines = 0, []
    for arm in arms:
        recorded = [r for r in rows if r["arm"] == arm.name and r["windows"] == args.windows]
        if not recorded:
            print(f"bench_quality: error: arm {arm.name!r} has no row in {args.results}.jsonl to reproduce", file=sys.stderr)
            return 2
        row = _run(arm, teacher, windows, argparse.Namespace(**{**vars(args), "workdir": str(Path(args.workdir) / "reproduce")}), rows)
        diff = abs(row["ppl"] - recorded[-1]["ppl"]) / recorded[-1]["ppl"]
        failed += diff > REPRODUCE_TOLERANCE
        lines.append(f"| {arm.name} | {recorded[-1]['ppl']:.6g} | {row['ppl']:.6g} | {diff:.3%} | {'ok' if diff <= REPRODUCE_TOLERANCE else 'OFF BY MORE THAN 2%'} |")
        print(lines[-1], flush=True)
    command = f"python jobs/bench_quality.py --teacher {args.teacher} --windows {args.windows} --reproduce {args.reproduce}"
    Path(args.results + "_reproduce.md").write_text("\n".join([
        "# Reproducing arms of the quality study", "", f"Command: `{command}` ({time.strftime('%Y-%m-%d')}); tolerance {REPRODUCE_TOLERANCE:.0%}.", "",
        "| arm | table ppl | rerun ppl | difference | |", "|---|---:|---:|---:|---|", *lines]) + "\n")
    return 1 if failed else 0


def _report(rows: list[dict], args: argparse.Namespace, argv: list[str] | None) -> None:
    load = os.getloadavg()[0]  # perplexities do not depend on it; the convert/eval seconds do
    machine = f"{platform.node()}, {os.cpu_count()} cores (load average {load:.1f} when written), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python jobs/bench_quality.py " + " ".join(flags)
    order = {a.name: i for i, a in enumerate(_arms(GROUPS))}
    table = sorted((r for r in rows if r["windows"] == args.windows), key=lambda r: order.get(r["arm"], len(order)))
    quality.write_report(table, Path(args.results + ".md"), Path(args.results + ".png"), command, machine)


if __name__ == "__main__":
    sys.exit(main())
