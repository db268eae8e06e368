"""Benchmark: tokenising a corpus with the Ray Data job (1 and 2 single-threaded workers) against one process
with one tokenizer thread, and a worker's data-path peak RSS from a token set against the in-memory path.

    python jobs/bench_tokenize.py --tokenizer MODEL_DIR [--repeat 9] [--out results/bench_tokenize.md]

The corpus is the embedded default corpus (CPython stdlib sources) repeated --repeat times (symlinked copies
under distinct paths, so every copy is its own documents). Every arm is profiled by CPU seconds per process
(driver, tokenizer actors, other Ray processes): on a small machine the total CPU an arm needs, over the
cores, bounds its wall time from below. The RSS arms (1 copy and --repeat copies) each run in a fresh
subprocess that builds the worker's token streams exactly as a training worker does
(`rrt_ray.train.data_prep.token_arrays`) and draws 200 batches; the model is left out, it is the same on both
sides. The in-memory side finds its tokens already cached (filled from the token set, the same tokens), so it
pays for reading the texts but not for tokenising them again: a lower bound on its first-run RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RSS_PROBE = """
import json, sys
from transformers import AutoTokenizer
from rrt_ray.train.config import DataConfig
from rrt_ray.train.data_prep import token_arrays
from rrt_ray.data import ShardedSequenceLoader
source, tokenizer, cache = sys.argv[1:4]
cfg = DataConfig(source=source, cache_dir=cache, seq_len=256, micro_batch_size=8)
train, _ = token_arrays(cfg, AutoTokenizer.from_pretrained(tokenizer))
loader = ShardedSequenceLoader(train, 256, 8, 0, 2, seed=0)
drawn = 0
while drawn < 200:  # each iter() is the rest of one epoch: small corpora take several
    drawn += sum(1 for _ in zip(range(200 - drawn), loader))
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec, so a probe started by a large
# driver would report the driver's peak (seen: both arms equal to the byte at the driver's RSS)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": peak_kb / 1024, "tokens": len(train)}))
"""


class CpuProfile:
    """CPU seconds (user + system) this process and its Ray processes spend inside the block, by role;
    sampled every 0.2 s, since an actor's counters vanish with it (an actor's last 0.2 s can be missed)."""

    def __enter__(self) -> "CpuProfile":
        import psutil

        self.me, self.first, self.last, self.role = psutil.Process(), {}, {}, {}
        self.load = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._sample()
        self.first = dict(self.last)  # processes already running: count only what they spend from now on
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def _sample(self) -> None:
        import psutil

        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                self.last[proc.pid] = times.user + times.system
                line = " ".join(proc.cmdline())  # read each time: a Ray worker retitles itself when it becomes an actor
                if proc.pid == self.me.pid:
                    self.role[proc.pid] = "driver"
                elif "MapBatches" in line or "MapWorker" in line or self.role.get(proc.pid) != "tokenizer actors":
                    self.role[proc.pid] = "tokenizer actors" if "MapBatches" in line or "MapWorker" in line else "other Ray"
            except psutil.Error:
                continue

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.load.append(os.getloadavg()[0])
        self.cpu = {name: 0.0 for name in ("driver", "tokenizer actors", "other Ray")}
        for pid, seconds in self.last.items():
            self.cpu[self.role[pid]] += seconds - self.first.get(pid, 0.0)


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
    start, total = time.perf_counter(), 0  # from here on, as in the Ray arms (their tokenizer loads are inside)
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


def fill_in_memory_cache(source: str, token_set: str, tokenizer_dir: str, cache: Path) -> None:
    """Put the token set's tokens where the in-memory path caches the same texts' tokens."""
    import numpy as np
    from transformers import AutoTokenizer

    from rrt_ray import data
    from rrt_ray.data.packing import cache_key
    from rrt_ray.data.token_sets import TokenSetStream

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        stream = TokenSetStream(token_set, split)
        np.save(cache / f"tokens-{cache_key(data.load_texts(source, split), tokenizer)[:32]}.npy", stream[0:len(stream)])


def rss(source: str, tokenizer_dir: str, cache: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, source, tokenizer_dir, str(cache)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"RSS probe on {source} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="model directory whose tokenizer to use")
    parser.add_argument("--repeat", type=int, default=9, help="copies of the default corpus (9 x 12 MB = 108 MB)")
    parser.add_argument("--out", default="results/bench_tokenize.md")
    args = parser.parse_args(argv)
    import ray

    from rrt_ray import storage

    with tempfile.TemporaryDirectory(prefix="rrt-bench-tok-") as tmp:
        tmp = Path(tmp)
        corpus, size = repeated_corpus(tmp / "corpus", args.repeat)
        print(f"corpus: {size / 1e6:.1f} MB", flush=True)
        arms = {}
        with CpuProfile() as profile:
            tokens, seconds = one_process(corpus, args.tokenizer)
        arms["one process"] = (seconds, profile)
        print(f"one process: {tokens:,} tokens in {seconds:.1f} s, CPU {profile.cpu}, load {profile.load}", flush=True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for workers in (2, 1):
            with CpuProfile() as profile:
                got, seconds = ray_job(corpus, args.tokenizer, tmp / f"sets{workers}", workers)
            assert got == tokens, (got, tokens)
            arms[f"Ray Data, {workers} worker{'s' * (workers > 1)}"] = (seconds, profile)
            print(f"ray data, {workers} worker(s): {got:,} tokens in {seconds:.1f} s, CPU {profile.cpu}, load {profile.load}", flush=True)
        memory = []
        small, small_size = repeated_corpus(tmp / "rss1", 1)
        for copies, source, source_size, sets in ((1, small, small_size, tmp / "rss-sets1"), (args.repeat, corpus, size, tmp / "sets2")):
            ray_job(source, args.tokenizer, sets, 2)  # for the full corpus: built already, reused
            token_set = storage.read_latest(str(sets))
            fill_in_memory_cache(str(source), token_set, args.tokenizer, tmp / "cache")
            memory.append((copies, source_size, rss(str(source), args.tokenizer, tmp / "cache"), rss(token_set, args.tokenizer, tmp / "cache")))
            print(f"RSS at {source_size / 1e6:.0f} MB: in-memory {memory[-1][2]}, token set {memory[-1][3]}", flush=True)
        ray.shutdown()
    write_results(args, size, tokens, arms, memory)
    return 0


def write_results(args, size, tokens, arms, memory) -> None:
    base, base_cpu = arms["one process"][0], sum(arms["one process"][1].cpu.values())
    lines = [
        "# bench_tokenize: Ray Data tokenisation vs one process; worker RSS from a token set vs in memory", "",
        f"Command: `python jobs/bench_tokenize.py --tokenizer {args.tokenizer} --repeat {args.repeat}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, the load column shows what else ran; "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"Corpus: the default corpus repeated {args.repeat} times, {size / 1e6:.1f} MB, {tokens:,} tokens. "
        "Ray arms include starting the actors and writing shards + manifest; all arms one tokenizer thread each. "
        "CPU: seconds spent by the driver / tokenizer actors / other Ray processes during the arm. "
        "Bound: the speedup the arm could reach over one process if its CPU seconds ran on all cores without "
        "idling: (one process's CPU seconds) / (the arm's CPU seconds / cores); CPU seconds, unlike wall time, "
        "barely depend on what else runs on the machine. Load: 1-minute load average at start and end.", "",
        "| arm | seconds | tokens/s | vs one process | CPU driver / actors / other (s) | bound | load |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (seconds, profile) in arms.items():
        cpu = profile.cpu
        bound = "-" if name == "one process" else f"{base_cpu / (sum(cpu.values()) / (os.cpu_count() or 1)):.2f}x"
        lines.append(f"| {name} | {seconds:.1f} | {tokens / seconds:,.0f} | {base / seconds:.2f}x | "
                     f"{cpu['driver']:.0f} / {cpu['tokenizer actors']:.0f} / {cpu['other Ray']:.0f} | {bound} | "
                     f"{profile.load[0]:.1f} -> {profile.load[1]:.1f} |")
    lines += ["", "Peak RSS of a worker's data path (token streams + 200 batches of 8 x 256; model excluded):", "",
              "| corpus | in-memory path (MB) | token set (MB) | ratio |", "|---|---:|---:|---:|"]
    for copies, small_size, in_memory, token_set in memory:
        lines.append(f"| {small_size / 1e6:.0f} MB ({copies} copies) | {in_memory['peak_rss_mb']:.0f} | {token_set['peak_rss_mb']:.0f} | {token_set['peak_rss_mb'] / in_memory['peak_rss_mb']:.2f}x |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
