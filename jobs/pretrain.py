"""Pretrain the demo teacher (a small Llama + BPE tokenizer) on Ray Train; cached by content.

    python jobs/pretrain.py --config jobs/configs/pretrain_demo.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_demo.yaml

Prints the published teacher directory (`<run.output>/teacher-<key>`; run.output's "latest" names it).
A second run with the same settings and corpus reuses it without training.
"""

from __future__ import annotations

import argparse
import sys

from rrt_ray.storage import StorageError
from rrt_ray.train.pretrain import PretrainConfig, pretrain_teacher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file under jobs/configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as optim.max_steps=100")
    args = parser.parse_args(argv)
    try:
        from rrt_ray import storage
        from rrt_ray.train.prepare import check_data_source

        cfg = PretrainConfig.load(args.config, args.overrides)
        check_data_source(cfg.data.source)
        for uri in (cfg.data.source, cfg.run.storage, cfg.run.output):
            if storage.is_remote(uri):
                storage.check_s3_access(uri)
    except (ValueError, StorageError) as err:
        print(f"pretrain: error: {err}", file=sys.stderr)
        return 2
    try:
        uri = pretrain_teacher(cfg, log=lambda line: print(f"pretrain: {line}", flush=True))
    except RuntimeError as err:
        print(f"pretrain: error: {err}", file=sys.stderr)
        return 1
    print(f"pretrain: teacher at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
