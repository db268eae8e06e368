"""Token sets: a corpus tokenised once, in parallel on a Ray cluster, into fixed-size token shards.

For corpora that do not fit a node. `build_token_set` (run by `jobs/tokenize_corpus.py`) reads the same
documents `load_texts` reads (txt / jsonl / parquet files, a local directory or glob, an s3:// prefix, or
"default"), in the same order and with the same per-document held-out split, tokenises them with Ray Data
(`map_batches` on an actor pool: one tokenizer per actor, one CPU each) and streams the token ids, in
document order with eos after each document, into shards of exactly `shard_tokens` tokens (the last one
shorter) per split:

    OUT/                                  local directory or s3://bucket/prefix
      latest                              -> "tokens-<key>", moved only after the manifest is written
      tokens-<key>/
        train-00000.npy train-00001.npy ... heldout-00000.npy
        token_set.json                    format, source, tokenizer fingerprint, dtype, shard_tokens,
                                          per split: tokens, documents, shards (file, tokens, sha256)

The key hashes the format, the tokenizer fingerprint, the shard size and the source's file list with
sizes, so the same job run twice reuses the published set.

Training reads a token set through `TokenSetStream`: a split as one sliceable token stream whose shards are
memory-mapped one or two at a time (local), or downloaded and checksummed into a cache just ahead of use
(s3://), never the whole corpus. Its shard size is the loader's shuffle block
(`rrt_ray.data.loader`), so a worker reads one shard at a time and the batches equal those of the
in-memory path on the same text.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from rrt_ray import paths, storage
from rrt_ray.data.corpus import SUFFIXES, TEXT_COLUMN, default_corpus_files, is_heldout, local_files
from rrt_ray.data.loader import DEFAULT_BLOCK_TOKENS
from rrt_ray.data.packing import token_dtype, tokenizer_fingerprint

FORMAT = "rrt-token-set-v1"
MANIFEST = "token_set.json"
SPLITS = ("train", "heldout")
OPEN_SHARDS = 3  # memory-mapped at once per stream: the block being read, the next, one spare
CACHED_SHARDS = 8  # downloaded S3 shards kept on local disk per stream


# ---------------------------------------------------------------- documents, as load_texts sees them


@dataclass(frozen=True)
class DocumentFile:
    key: str  # the split key load_texts uses (path relative to the source root)
    uri: str  # local path or s3:// URI
    size: int


def document_files(source: str) -> list[DocumentFile]:
    """The source's data files, in load_texts' order, with their split keys."""
    if source == "default":
        return [DocumentFile(key, str(path), path.stat().st_size) for key, path in default_corpus_files()]
    if storage.is_remote(source):
        return _s3_document_files(source)
    return [DocumentFile(key, str(path), path.stat().st_size) for key, path in local_files(source)]


def _s3_document_files(prefix: str) -> list[DocumentFile]:
    if prefix.endswith(SUFFIXES) and storage.exists(prefix):  # a single object
        return [DocumentFile(prefix.rsplit("/", 1)[1], prefix, 0)]
    files = storage.list_files(prefix)
    keys = sorted(
        (key for key in files if key.endswith(SUFFIXES) and not any(part.startswith(".") for part in key.split("/"))),
        key=lambda key: PurePosixPath(key).parts,  # the order of load_texts' sorted local paths
    )
    if not keys:
        raise ValueError(f"data source {prefix!r} has no {'/'.join(SUFFIXES)} objects")
    return [DocumentFile(key, storage.join(prefix, key), files[key]) for key in keys]


def read_documents(file: DocumentFile) -> Iterator[tuple[str, str]]:
    """(split key, text) of every document of one file, as load_texts reads it (text-mode decoding)."""
    data = storage.read_bytes(file.uri)
    if file.uri.endswith(".jsonl"):
        lines = [line for line in io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").read().splitlines() if line.strip()]
        texts = [json.loads(line).get(TEXT_COLUMN) for line in lines]
        yield from ((f"{file.key}#{row}", text) for row, text in enumerate(texts) if text)
    elif file.uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if TEXT_COLUMN not in table.column_names:
            raise ValueError(f"{file.uri} has no {TEXT_COLUMN!r} column; columns found: {table.column_names}")
        yield from ((f"{file.key}#{row}", text) for row, text in enumerate(table.column(TEXT_COLUMN).to_pylist()) if text)
    else:  # one document per file (.txt, and the default corpus's .py / .rst sources)
        text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace").read()
        if text:
            yield file.key, text


class _Tokenize:
    """Ray Data actor: one tokenizer per actor; a batch of files -> their documents, read as load_texts
    reads them, tokenised into one token run per split. (Reading happens in the actor too: a separate
    read stage would need a CPU of its own beside the actors, which a 2-CPU cluster does not have.)"""

    def __init__(self, tokenizer_uri: str) -> None:
        from rrt_ray.data.packing import tokenize_texts

        self.tokenizer = load_tokenizer(tokenizer_uri)
        self.tokenize_texts = tokenize_texts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        documents = [
            (key, text)
            for key_, uri, size in zip(batch["key"], batch["uri"], batch["size"])
            for key, text in read_documents(DocumentFile(str(key_), str(uri), int(size)))
        ]
        splits, runs, docs = [], [], []
        for split in SPLITS:
            texts = [text for key, text in documents if is_heldout(key) == (split == "heldout")]
            if texts:
                splits.append(split)
                runs.append(self.tokenize_texts(texts, self.tokenizer).tobytes())
                docs.append(len(texts))
        return {"split": np.array(splits, dtype=object), "tokens": np.array(runs, dtype=object), "documents": np.array(docs)}


def load_tokenizer(uri: str) -> Any:
    """AutoTokenizer from a local model directory or an s3:// one (downloaded once into the cache)."""
    from transformers import AutoTokenizer

    if storage.is_remote(uri):
        local = Path(paths.cache_dir("tokenizers")).expanduser() / hashlib.sha256(uri.encode()).hexdigest()[:16]
        if not (local / "tokenizer_config.json").is_file():
            storage.download_dir(uri, str(local))
        uri = str(local)
    return AutoTokenizer.from_pretrained(uri)


# ---------------------------------------------------------------- writing


class _ShardWriter:
    """Cuts one split's token stream into shards of exactly shard_tokens tokens and writes them."""

    def __init__(self, out_uri: str, split: str, shard_tokens: int, dtype: type) -> None:
        self.out_uri, self.split, self.shard_tokens, self.dtype = out_uri, split, shard_tokens, dtype
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.documents = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.tokens += len(tokens)
        self.documents += documents
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[: self.shard_tokens])
            self.pending, self.pending_tokens = [stream[self.shard_tokens:]], len(stream) - self.shard_tokens

    def close(self) -> dict[str, Any]:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}

    def _write(self, shard: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(shard, dtype=self.dtype))
        name = f"{self.split}-{len(self.shards):05d}.npy"
        storage.write_bytes(storage.join(self.out_uri, name), buffer.getvalue())
        self.shards.append({"file": name, "tokens": int(len(shard)), "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()})


def token_set_name(files: list[DocumentFile], source: str, fingerprint: str, shard_tokens: int) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT, source, fingerprint, shard_tokens, [(f.key, f.size) for f in files]]).encode())
    return "tokens-" + digest.hexdigest()[:16]


def build_token_set(
    source: str,
    tokenizer_uri: str,
    out_uri: str,
    shard_tokens: int = DEFAULT_BLOCK_TOKENS,
    num_workers: int = 2,
    batch_files: int = 16,
    worker_env: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Tokenise source into a token set under out_uri (Ray must be initialised); return its URI."""
    import ray.data

    files = document_files(source)
    tokenizer = load_tokenizer(tokenizer_uri)
    fingerprint = tokenizer_fingerprint(tokenizer)
    name = token_set_name(files, source, fingerprint, shard_tokens)
    target = storage.join(out_uri, name)
    if storage.exists(storage.join(target, MANIFEST)):
        log(f"token set {target} already built: reusing it")
        storage.write_latest(out_uri, name)
        return target
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards hold documents in load_texts' order
    items = [{"key": f.key, "uri": f.uri, "size": f.size} for f in files]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(files) // batch_files, 256))).map_batches(
        _Tokenize, fn_constructor_args=(tokenizer_uri,), batch_size=batch_files, concurrency=num_workers, num_cpus=1,
        batch_format="numpy", runtime_env={"env_vars": dict(worker_env or {})},
    )
    dtype = token_dtype(len(tokenizer))
    writers = {split: _ShardWriter(target, split, shard_tokens, dtype) for split in SPLITS}
    log(f"tokenizing {len(files)} files ({sum(f.size for f in files) / 1e6:.1f} MB) from {source} with {num_workers} workers -> {target}")
    _drain(dataset, writers, dtype, log)
    manifest = {
        "format": FORMAT,
        "source": source,
        "tokenizer": {"fingerprint": fingerprint, "uri": tokenizer_uri, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id},
        "dtype": np.dtype(dtype).name,
        "shard_tokens": shard_tokens,
        "splits": {split: writer.close() for split, writer in writers.items()},
    }
    storage.write_text(storage.join(target, MANIFEST), json.dumps(manifest, indent=1))  # last: the set is complete
    storage.write_latest(out_uri, name)
    return target


def _drain(dataset: Any, writers: dict[str, _ShardWriter], dtype: type, log: Callable[[str], None]) -> None:
    """Pull the tokenised batches in order into the shard writers, with a progress bar and tokens/s."""
    from tqdm import tqdm

    start = last_line = time.perf_counter()
    total = 0
    with tqdm(unit=" tokens", unit_scale=True, desc="tokenize", mininterval=2.0) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for split, run, documents in zip(batch["split"], batch["tokens"], batch["documents"]):
                tokens = np.frombuffer(run, dtype=dtype)
                writers[split].add(tokens, int(documents))
                total += len(tokens)
                bar.update(len(tokens))
            now = time.perf_counter()
            if now - last_line >= 15:  # a plain line too, for job logs that drop the bar's carriage returns
                log(f"tokenize: {total:,} tokens, {total / (now - start):,.0f} tokens/s")
                last_line = now
    elapsed = time.perf_counter() - start
    log(f"tokenize: {total:,} tokens in {elapsed:.1f} s, {total / max(elapsed, 1e-9):,.0f} tokens/s")


# ---------------------------------------------------------------- reading


def resolve_token_set(source: str) -> str | None:
    """The token set a data source names (a set, or a root whose "latest" names one), or None."""
    if source == "default" or any(ch in source for ch in "*?["):
        return None
    try:
        if storage.exists(storage.join(source, MANIFEST)):
            return source
        latest = storage.read_latest(source)
    except (ValueError, OSError):
        return None
    if latest is not None and storage.exists(storage.join(latest, MANIFEST)):
        return latest
    return None


def load_manifest(uri: str) -> dict[str, Any]:
    manifest = json.loads(storage.read_text(storage.join(uri, MANIFEST)))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{uri} is a token set of format {manifest.get('format')!r}; this rrt-ray reads {FORMAT!r}")
    return manifest


class TokenSetStream:
    """One split of a token set as a 1-D token stream: `len`, slicing, `dtype`, `block_tokens` (= the
    shard size) and `will_need(block)`, which the loader calls with the block it reads next."""

    ndim = 1

    def __init__(self, uri: str, split: str, cache_dir: str = paths.cache_dir("token-sets"), manifest: dict | None = None) -> None:
        self.uri = uri
        self.manifest = manifest or load_manifest(uri)
        if split not in self.manifest["splits"]:
            raise ValueError(f"token set {uri} has no split {split!r}; splits: {', '.join(self.manifest['splits'])}")
        self.shards = self.manifest["splits"][split]["shards"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.block_tokens = int(self.manifest["shard_tokens"])
        self.offsets = np.cumsum([0] + [shard["tokens"] for shard in self.shards])  # (num_shards + 1,)
        remote = storage.is_remote(uri)
        self.local_root = Path(cache_dir).expanduser() / hashlib.sha256(uri.encode()).hexdigest()[:16] if remote else Path(uri).expanduser()
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._verified: set[int] = set()
        self._downloaded: list[int] = []
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-shards") if remote else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a token set stream supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        pieces = []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            base = int(self.offsets[shard])
            end = min(stop, int(self.offsets[shard + 1]))
            pieces.append(self._shard(shard)[start - base:end - base])
            start, shard = end, shard + 1
        return np.concatenate(pieces) if len(pieces) != 1 else np.asarray(pieces[0])

    def will_need(self, block: int) -> None:
        """Start fetching the shards a block reads (its own and the next, for the window that straddles)."""
        for shard in (block, block + 1):
            if self._pool is not None and 0 <= shard < len(self.shards):
                with self._lock:
                    if shard not in self._pending and not (self.local_root / self.shards[shard]["file"]).is_file():
                        self._pending[shard] = self._pool.submit(self._download, shard)

    def _shard(self, index: int) -> np.ndarray:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        path = self._local_shard(index)
        if index not in self._verified:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != self.shards[index]["sha256"]:
                raise storage.ChecksumError(f"token shard {self.uri}/{self.shards[index]['file']}: sha256 {digest} != manifest {self.shards[index]['sha256']}")
            self._verified.add(index)
        self._open[index] = np.load(path, mmap_mode="r")
        while len(self._open) > OPEN_SHARDS:  # unmapping drops the shard's pages from this process's RSS
            self._open.popitem(last=False)
        return self._open[index]

    def _local_shard(self, index: int) -> Path:
        path = self.local_root / self.shards[index]["file"]
        if self._pool is None:
            return path
        with self._lock:
            pending = self._pending.get(index)
        if pending is not None:
            pending.result()
        elif not path.is_file():
            self._download(index)
        return path

    def _download(self, index: int) -> None:
        name = self.shards[index]["file"]
        storage.write_bytes(str(self.local_root / name), storage.read_bytes(storage.join(self.uri, name)))  # atomic locally
        with self._lock:
            self._pending.pop(index, None)
            self._downloaded.append(index)
            while len(self._downloaded) > CACHED_SHARDS:
                old = self._downloaded.pop(0)
                if old not in self._open and old not in self._pending:
                    (self.local_root / self.shards[old]["file"]).unlink(missing_ok=True)
                    self._verified.discard(old)
