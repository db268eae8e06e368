"""Benchmark: tokenising a corpus with the Ray Data job (1 and 2 single-threaded workers) against one process
with one tokenizer thread, and a worker's data-path peak RSS from a token set against the in-memory path.

    python jobs/bench_tokenize.py --tokenizer MODEL_DIR [--repeat 9] [--out results/bench_tokenize.md]

The corpus is the embedded default corpus (CPython stdlib sources) repeated --repeat times (symlinked copies
under distinct paths, so every copy is its own documents). The RSS arms each run in a fresh subprocess that
builds the worker's token streams exactly as a training worker does (`rrt_ray.train.data_prep.token_arrays`)
and draws 200 batches; the model is left out, it is the same on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RSS_PROBE = """
import json, resource, sys
from transformers import AutoTokenizer
from rrt_ray.train.config import DataConfig
from rrt_ray.train.data_prep import token_arrays
from rrt_ray.data import ShardedSequenceLoader
source, tokenizer, cache = sys.argv[1:4]
cfg = DataConfig(source=source, cache_dir=cache, seq_len=256, micro_batch_size=8)
train, _ = token_arrays(cfg, AutoTokenizer.from_pretrained(tokenizer))
loader = iter(ShardedSequenceLoader(train, 256, 8, 0, 2, seed=0))
for _ in range(200):
    next(loader)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tokens": len(train)}))
"""


def repeated_corpus(root: Path, repeat: int) -> tuple[Path, int]:
    from rrt_ray import data

    size = 0
    for copy in range(repeat):
        for key, path in data.default_corpus_files():
            target = root / f"copy{copy}" / (key.replace("/", "__") + ".txt")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
            size += path.stat().st_size
    return root, size


def one_process(corpus: Path, tokenizer_dir: str) -> tuple[int, float]:
    """Read every document and tokenise it in this process, one tokenizer thread."""
    from transformers import AutoTokenizer

    from rrt_ray.data.packing import tokenize_texts
    from rrt_ray.data.token_sets import document_files, read_documents

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start, total = time.perf_counter(), 0
    files = document_files(str(corpus))
    for i in range(0, len(files), 16):  # the job's batches of 16 files, so both sides do the same work
        texts = [text for file in files[i:i + 16] for _, text in read_documents(file)]
        total += len(tokenize_texts(texts, tokenizer))
    return total, time.perf_counter() - start


def ray_job(corpus: Path, tokenizer_dir: str, out: Path, workers: int) -> tuple[int, float]:
    from rrt_ray.data.token_sets import build_token_set, load_manifest

    start = time.perf_counter()
    uri = build_token_set(str(corpus), tokenizer_dir, str(out), num_workers=workers, batch_files=16,
                          worker_env={"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}, log=lambda line: None)
    elapsed = time.perf_counter() - start
    return sum(s["tokens"] for s in load_manifest(uri)["splits"].values()), elapsed


def rss(source: str, tokenizer_dir: str, cache: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, source, tokenizer_dir, str(cache)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="model directory whose tokenizer to use")
    parser.add_argument("--repeat", type=int, default=9, help="copies of the default corpus (9 x 12 MB = 108 MB)")
    parser.add_argument("--rss-repeats", default="2,8", help="two corpus sizes (copies) for the RSS comparison")
    parser.add_argument("--out", default="results/bench_tokenize.md")
    args = parser.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory(prefix="rrt-bench-tok-") as tmp:
        tmp = Path(tmp)
        corpus, size = repeated_corpus(tmp / "corpus", args.repeat)
        print(f"corpus: {size / 1e6:.1f} MB", flush=True)
        base_tokens, base_s = one_process(corpus, args.tokenizer)
        print(f"one process: {base_tokens:,} tokens in {base_s:.1f} s", flush=True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        arms = {}
        for workers in (1, 2):
            tokens, seconds = ray_job(corpus, args.tokenizer, tmp / f"sets{workers}", workers)
            assert tokens == base_tokens, (tokens, base_tokens)
            arms[workers] = seconds
            print(f"ray data, {workers} worker(s): {tokens:,} tokens in {seconds:.1f} s", flush=True)
        memory = []
        for copies in map(int, args.rss_repeats.split(",")):
            small, small_size = repeated_corpus(tmp / f"rss{copies}", copies)
            token_set = ray_job(small, args.tokenizer, tmp / f"rss-sets{copies}", 2) and str(tmp / f"rss-sets{copies}")
            memory.append((copies, small_size, rss(str(small), args.tokenizer, tmp / "cache"), rss(token_set, args.tokenizer, tmp / "cache")))
            print(f"RSS at {small_size / 1e6:.0f} MB: in-memory {memory[-1][2]}, token set {memory[-1][3]}", flush=True)
        ray.shutdown()
    write_results(args, size, base_tokens, base_s, arms, memory)
    return 0


def write_results(args, size, tokens, base_s, arms, memory) -> None:
    rate = {name: tokens / seconds for name, seconds in (("one process", base_s), ("ray 1 worker", arms[1]), ("ray 2 workers", arms[2]))}
    lines = [
        "# bench_tokenize: Ray Data tokenisation vs one process; worker RSS from a token set vs in memory", "",
        f"Command: `python jobs/bench_tokenize.py --tokenizer {args.tokenizer} --repeat {args.repeat} --rss-repeats {args.rss_repeats}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, shared by six engineers and noisy today "
        f"(other test runs in parallel); date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"Corpus: the default corpus repeated {args.repeat} times, {size / 1e6:.1f} MB, {tokens:,} tokens. "
        "Ray arms include starting the actors and writing shards + manifest; all arms one tokenizer thread each.", "",
        "| arm | seconds | tokens/s | vs one process |", "|---|---:|---:|---:|",
    ]
    for name, value in rate.items():
        lines.append(f"| {name} | {tokens / value:.1f} | {value:,.0f} | {value / rate['one process']:.2f}x |")
    lines += ["", "Peak RSS of a worker's data path (token streams + 200 batches of 8 x 256; model excluded):", "",
              "| corpus | in-memory path (MB) | token set (MB) | ratio |", "|---|---:|---:|---:|"]
    for copies, small_size, in_memory, token_set in memory:
        lines.append(f"| {small_size / 1e6:.0f} MB ({copies} copies) | {in_memory['peak_rss_mb']:.0f} | {token_set['peak_rss_mb']:.0f} | {token_set['peak_rss_mb'] / in_memory['peak_rss_mb']:.2f}x |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
