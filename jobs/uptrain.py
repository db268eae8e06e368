"""Uptrain a (Relaxed) Recursive Transformer with distillation from the original model, on Ray Train.

    python jobs/uptrain.py --config jobs/configs/demo.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/uptrain.py --config jobs/configs/demo.yaml

Recipe: parse the config, check every path and credential (one clear line and exit 2 on bad input,
before any worker starts), convert the teacher unless model.student names a converted model, train
with DeepSpeed ZeRO on Ray Train (checkpoints to run.storage, resumed automatically; one log line per
report with tokens/s and the time left; TensorBoard events under run.storage/run.name/tensorboard), export
the uptrained model as a Hugging Face directory published under run.output.
"""

from __future__ import annotations

import argparse
import json
import sys

from rrt_ray.storage import StorageError
from rrt_ray.train.config import TrainConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file under jobs/configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 zero.stage=3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    except RuntimeError as err:
        print(f"uptrain: error: {err}", file=sys.stderr)
        return 1
    summary = {k: metrics.get(k) for k in ("step", "loss", "kd_loss", "heldout_ppl", "tokens_per_s", "export_max_logit_diff", "export_uri")}
    print("uptrain: done " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
