"""Which calibration choice moves held-out perplexity: calibrated conversions of one teacher, one process.

    python jobs/bench_calibration.py --teacher /work/shared-out/models/smollm2-135m --arms base,damp1e-4

Every arm is a real `convert_checkpoint` (2 loops, average init, rank 64 unless the arm says otherwise) with
its calibration options, scored on the quality study's yardstick (rrt_ray.quality: the first W 256-token
held-out windows). The original model's calibration statistics depend only on the draw (sequences, seq_len,
seed), so they are computed once per draw and reused by the arms that share it: each arm's weights are what a
separate `rrt convert` would write. Rows are appended to results/calibration_smollm2.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import rrt_ray  # noqa: F401
from rrt_ray import quality
from rrt_ray.convert import calibrate, convert

BASE = {"loops": 2, "init": "average", "lora_rank": 64}
ARMS = {  # name -> (convert options over BASE, calibration options over quality.CALIBRATION)
    "plain": ({}, None),
    "base": ({}, {}),
    "damp1e-3": ({}, {"damping": 1e-3}),
    "damp1e-4": ({}, {"damping": 1e-4}),
    "damp0": ({}, {"damping": 0.0}),
    "damp1e-1": ({}, {"damping": 0.1}),
    "plain-shared": ({}, {"weighted_shared": False}),
    "recursive": ({}, {"inputs": "recursive"}),
    "corrected": ({}, {"inputs": "recursive_corrected"}),
    "corrected-plain-shared": ({}, {"inputs": "recursive_corrected", "weighted_shared": False}),
    "corrected-damp1e-3": ({}, {"inputs": "recursive_corrected", "damping": 1e-3}),
    "corrected-128seq": ({}, {"inputs": "recursive_corrected", "sequences": 128}),
    "corrected-r128": ({"lora_rank": 128}, {"inputs": "recursive_corrected"}),
    "corrected-recon": ({}, {"inputs": "recursive_corrected", "reconstruct": True}),
    "corrected-recon-lr3e-4": ({}, {"inputs": "recursive_corrected", "reconstruct": True, "reconstruct_steps": 10, "reconstruct_lr": 3e-4}),
}


def _memoized_stats():
    """calibration_stats, computed once per (source, draw, hidden states kept) in this process."""
    cache: dict = {}
    compute = calibrate.calibration_stats

    def stats(src_path, spec):
        keep = spec.reconstruct or spec.sequential
        key = (str(src_path), spec.sequences, spec.seq_len, spec.data, spec.seed, spec.batch_size, keep)
        if key not in cache:
            cache.clear()  # one draw at a time: the hidden states of 32 x 256 tokens are ~1 GB
            cache[key] = compute(src_path, spec)
        return cache[key]

    return stats


def _logged_calibrate_dir(errors: dict):
    """calibrate_dir with a per-position log line (elapsed seconds first), its errors kept for the row."""
    real, started = calibrate.calibrate_dir, time.perf_counter()

    def calibrate_dir(*args, **kwargs):
        log = lambda line: print(f"[{time.perf_counter() - started:7.1f} s] {line}", flush=True)  # noqa: E731
        errors.update(real(*args, log=log, **kwargs))
        return errors

    return calibrate_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="out/models/smollm2-135m")
    parser.add_argument("--arms", default="base", help=f"comma-separated, from: {', '.join(ARMS)}")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--results", default="results/calibration_smollm2.jsonl")
    parser.add_argument("--workdir", default="out/calibration")
    args = parser.parse_args(argv)
    names = args.arms.split(",")
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        print(f"bench_calibration: error: unknown arm {unknown[0]!r}; allowed: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoTokenizer

    windows = quality.heldout_windows(AutoTokenizer.from_pretrained(args.teacher), args.windows)
    convert.calibration_stats = _memoized_stats()  # what _convert_local calls
    for name in names:
        options, calibration = ARMS[name]
        options = {**BASE, **options}
        if calibration is not None:
            options["calibration"] = {**quality.CALIBRATION, **calibration}
        started, errors = time.perf_counter(), {}
        convert.calibrate_dir = _logged_calibrate_dir(errors)
        out = Path(args.workdir) / name
        convert.convert_checkpoint(args.teacher, str(out), overwrite=True, progress=False, **options)
        convert_s = time.perf_counter() - started
        ppl = quality.window_perplexity(str(out), windows)
        shutil.rmtree(out, ignore_errors=True)
        row = {"arm": name, "options": options, "ppl": ppl, "windows": args.windows, "convert_s": round(convert_s, 1),
               "eval_s": round(time.perf_counter() - started - convert_s, 1), "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg()[0]}
        if errors:  # reconstruction's relative error per position, (before, after) training
            row["reconstruct_error"] = {str(k): [round(b, 5), round(a, 5)] for k, (b, a) in errors.items()}
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
