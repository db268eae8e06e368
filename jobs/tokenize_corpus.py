"""Tokenise a corpus once, in parallel on a Ray cluster, into a token set that training streams.

    python jobs/tokenize_corpus.py --source s3://bucket/corpus/ --tokenizer MODEL --out s3://bucket/tokens/NAME
    ray job submit --working-dir . -- python jobs/tokenize_corpus.py --source default --tokenizer out/teacher --out tokens/demo

Recipe: check the source, the tokenizer and the output (one clear line and exit 2 on bad input), join the
cluster (RAY_ADDRESS) or start a local one, read and tokenise with Ray Data (one tokenizer per actor),
write fixed-size token shards plus a manifest, then move OUT/latest. Train on it with
`jobs/uptrain.py ... data.source=OUT data.max_bytes=null`. (Not named tokenize.py: as a script that
name would shadow the standard library's `tokenize`, which traceback and linecache import.)
"""

from __future__ import annotations

import argparse
import os
import sys

from rrt_ray.storage import StorageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from rrt_ray.data.loader import DEFAULT_BLOCK_TOKENS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="'default', a local file/dir/glob of .txt/.jsonl/.parquet, or an s3:// prefix")
    parser.add_argument("--tokenizer", required=True, help="model directory (local or s3://) whose tokenizer to use")
    parser.add_argument("--out", required=True, help="root of the token set (local or s3://); OUT/latest names the result")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_BLOCK_TOKENS, help="tokens per shard (and the loader's shuffle block)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer actors (one CPU each)")
    parser.add_argument("--batch-files", type=int, default=16, help="files per tokenizer-actor call")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Bad input fails here, before Ray starts."""
    from rrt_ray import storage
    from rrt_ray.data.token_sets import document_files

    for flag, value in (("--shard-tokens", args.shard_tokens), ("--workers", args.workers), ("--batch-files", args.batch_files)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for uri in (args.source, args.tokenizer, args.out):
        if storage.is_remote(uri):
            storage.check_s3_access(uri)
    if not storage.exists(storage.join(args.tokenizer, "tokenizer_config.json")):
        raise ValueError(f"--tokenizer {args.tokenizer!r} has no tokenizer_config.json (give a Hugging Face model directory)")
    try:
        document_files(args.source)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check(args)
    except (ValueError, StorageError) as err:
        print(f"tokenize_corpus: error: {err}", file=sys.stderr)
        return 2
    import ray

    from rrt_ray.data.token_sets import build_token_set
    from rrt_ray.train.trainer import FORWARDED_ENV

    if not ray.is_initialized():
        ray.init(log_to_driver=True, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    uri = build_token_set(args.source, args.tokenizer, args.out, args.shard_tokens, args.workers, args.batch_files,
                          worker_env=env, log=lambda line: print(line, flush=True))
    print(f"tokenize_corpus: token set at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
