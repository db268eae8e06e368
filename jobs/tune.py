"""Sweep conversion and training options of a Relaxed Recursive Transformer with Ray Tune.

    python jobs/tune.py --config jobs/configs/tune_demo.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_demo.yaml

Recipe: parse the config; check the search space (every value builds a real TrainConfig and converter
spec; every point is planned against the teacher's config.json), then paths and credentials: one clear
line and exit 2 on bad input, before any cluster is joined. Then run (or, with the same sweep.name and
sweep.storage, resume) the sweep: each trial converts the teacher (cached by options) and uptrains it
on Ray Train within the token budget, ASHA cutting weak trials at the held-out milestones. Writes the
results table, plot, TensorBoard curves and the best model under <sweep.output>/<sweep.name>/.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from rrt_ray.storage import StorageError
from rrt_ray.tune.config import TuneConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file under jobs/configs/ (tune_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: sweep.name=x space.model.init=[stepwise] train.optim.warmup_steps=2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from rrt_ray.tune.sweep import plan_sweep

        cfg = TuneConfig.load(args.config, args.overrides)
        plans, text_config = plan_sweep(cfg)
    except (ValueError, StorageError) as err:
        print(f"tune: error: {err}", file=sys.stderr)
        return 2

    from rrt_ray.tune.sweep import run

    # `ray job stop` sends SIGTERM: turn it into Tune's own interrupt, which saves the sweep's state
    # so that the same command resumes it.
    stopped = threading.Event()

    def on_sigterm(*_: object) -> None:
        stopped.set()
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, on_sigterm)
    summary = run(cfg, plans, text_config, log=lambda line: print(line, flush=True), interrupted=stopped.is_set)
    if summary is None:
        return 130
    return 0 if summary["status"]["not run"] == 0 and summary["best"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
