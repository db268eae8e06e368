"""Uptrain a (Relaxed) Recursive Transformer with distillation from the original model, on Ray Train.

    python jobs/uptrain.py --config jobs/configs/demo.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/uptrain.py --config jobs/configs/demo.yaml

Recipe: parse the config, check every path and credential (one clear line and exit 2 on bad input,
before any worker starts), convert the teacher unless model.student names a converted model, train
with DeepSpeed ZeRO on Ray Train (checkpoints to run.storage, resumed automatically; one log line per
report with tokens/s and the time left; TensorBoard events under run.storage/run.name/tensorboard), export
the uptrained model as a Hugging Face directory published under run.output. Ctrl-C (SIGINT) or SIGTERM
stops the workers, keeps the last committed checkpoint as the run's "latest" and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from rrt_ray.storage import StorageError
from rrt_ray.train.config import TrainConfig
from rrt_ray.train.trainer import Interrupted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file under jobs/configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 zero.stage=3")
    return parser.parse_args(argv)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)  # before and after training; fit() handles it during
    try:
        return run(args)
    except KeyboardInterrupt as err:  # SIGINT / SIGTERM before training started (start-up, conversion)
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"uptrain: interrupted by {signal.Signals(signum).name} before training started", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    try:
        from rrt_ray.train.prepare import convert_teacher, preflight, warm_token_cache

        cfg = preflight(TrainConfig.load(args.config, args.overrides))
        if not cfg.model.student:
            cfg.model.student = convert_teacher(cfg)
        warm_token_cache(cfg)
    except (ValueError, StorageError) as err:
        print(f"uptrain: error: {err}", file=sys.stderr)
        return 2

    from rrt_ray.train.trainer import fit

    print(f"uptrain: {cfg.run.name}: student {cfg.model.student}, teacher {cfg.model.teacher or '-'}, "
          f"ZeRO-{cfg.zero.stage} {cfg.zero.precision}, {cfg.run.num_workers} workers, {cfg.optim.max_steps} steps")
    print(f"uptrain: TensorBoard: tensorboard --logdir {cfg.run.storage}  (events under {cfg.run.storage}/{cfg.run.name}/tensorboard)")
    try:
        metrics = fit(cfg)
    except Interrupted as err:
        from rrt_ray import storage

        latest = storage.read_latest(storage.join(cfg.run.storage, cfg.run.name))
        kept = f"the last good checkpoint is {latest} (rerun the same command to resume)" if latest else "no checkpoint had been written yet"
        print(f"uptrain: {err}: training stopped; {kept}", file=sys.stderr)
        return 128 + err.signum
    except RuntimeError as err:
        print(f"uptrain: error: {err}", file=sys.stderr)
        return 1
    summary = {k: metrics.get(k) for k in ("step", "loss", "kd_loss", "heldout_ppl", "tokens_per_s", "tokens_per_s_mean", "peak_rss_mb", "export_max_logit_diff", "export_uri")}
    print("uptrain: done " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
