"""Text sources: the embedded default corpus, local files, s3:// prefixes and hub datasets.

`load_texts(source, split, max_bytes)` returns a list of documents (str) for one split:

- "default": text every machine has. The CPython standard-library sources (*.py under
  `sysconfig.get_paths()["stdlib"]`, without test/tests/idle_test dirs, site-packages, the build
  config and the platform-specific `_sysconfigdata*`), plus Debian's python3.11-doc reST sources
  where that package is installed. Both are PSF-licensed. Files are ordered by a hash of their
  relative path, so that a small `max_bytes` slice mixes code and prose from across the tree.
- a local .txt / .jsonl / .parquet file, a directory of them (recursive) or a glob. A .txt file
  is one document; a .jsonl / .parquet row is one document, read from its "text" column with
  Hugging Face `datasets`. Files are read in sorted path order.
- an s3:// prefix (or object): downloaded through `rrt_ray.storage` into a cache dir, then as local.
- a hub dataset name ("org/name"): streamed with `datasets` when online; offline, a clear error.

Splits are chosen per document, deterministically, by hashing its key (relative path, plus the row
number for table rows): ~2% "heldout", the rest "train" ("all" is both). The split of a document
never depends on which other documents exist, so adding files never moves old ones across splits.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import socket
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from rrt_ray import paths

SPLITS = ("train", "heldout", "all")
SUFFIXES = (".txt", ".jsonl", ".parquet")
HELDOUT_PER_10K = 200  # 2% of documents are held out
TEXT_COLUMN = "text"
DEFAULT_CACHE_DIR = paths.cache_dir("sources")
DOC_SOURCE_DIRS = ("/usr/share/doc/python3.11/html/_sources", "/usr/share/doc/python3.11-doc/html/_sources")
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_GLOB_CHARS = set("*?[")
HUB_ENDPOINT = "https://huggingface.co"


def is_heldout(key: str) -> bool:
    """Whether the document with this key belongs to the held-out split (~2%, by sha256 of the key)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10_000
    return bucket < HELDOUT_PER_10K


def _in_split(key: str, split: str) -> bool:
    return split == "all" or is_heldout(key) == (split == "heldout")


def default_corpus_files() -> list[tuple[str, Path]]:
    """(key, path) of every file of the default corpus, in its fixed order (sha256 of the key).

    Keys are "stdlib/<path relative to the stdlib>" and "doc/<path relative to the doc sources>".
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                path = Path(dirpath) / name
                files.append(("stdlib/" + path.relative_to(stdlib).as_posix(), path))
    for doc_root in map(Path, DOC_SOURCE_DIRS):
        if doc_root.is_dir():
            for path in doc_root.rglob("*"):
                if path.is_file() and path.name.endswith((".rst", ".rst.txt", ".txt")):
                    files.append(("doc/" + path.relative_to(doc_root).as_posix(), path))
            break  # one copy of the docs, even if both package layouts are present
    return sorted(files, key=lambda item: (hashlib.sha256(item[0].encode()).hexdigest(), item[0]))


def _read_text_file(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _take(texts: Iterable[str], max_bytes: int | None) -> list[str]:
    """Documents in order until max_bytes of UTF-8; the last one is cut at a line end to fit."""
    taken: list[str] = []
    total = 0
    for text in texts:
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is None or total + size <= max_bytes:
            taken.append(text)
            total += size
            continue
        head = text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
        head = head[: head.rfind("\n") + 1] if "\n" in head else head
        if head:
            taken.append(head)
        break
    return taken


def load_texts(
    source: str, split: str = "train", max_bytes: int | None = None, cache_dir: str = DEFAULT_CACHE_DIR
) -> list[str]:
    """The documents of one split ("train", "heldout" or "all") of source, capped at max_bytes of UTF-8."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0 or None, got {max_bytes}")
    if source == "default":
        texts: Iterable[str] = (_read_text_file(path) for key, path in default_corpus_files() if _in_split(key, split))
    elif source.startswith("s3://"):
        texts = _local_texts(_fetch_s3(source, cache_dir), split, source)
    elif looks_local(source):
        texts = _local_texts(source, split, source)
    else:
        texts = _hub_texts(source, split)
    taken = _take(texts, max_bytes)
    if not taken:
        raise ValueError(f"data source {source!r} has no {split!r} documents (held-out is ~2% of the documents)")
    return taken


# ---------------------------------------------------------------- local files


def looks_local(source: str) -> bool:
    """An existing path, or one plainly meant as a path (a missing one is then an error, not a hub name)."""
    return (
        source.startswith(("file://", "/", "./", "../", "~"))
        or bool(_GLOB_CHARS & set(source))
        or source.endswith(SUFFIXES)
        or source.count("/") > 1
        or os.path.exists(source)
    )


def local_files(source: str) -> list[tuple[str, Path]]:
    """(key, path) of the data files a local source names, sorted by path; keys are relative paths."""
    pattern = os.path.expanduser(source.removeprefix("file://"))
    if _GLOB_CHARS & set(pattern):
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not paths:
            raise FileNotFoundError(f"data source {source!r} matches no files")
        root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    elif os.path.isdir(pattern):
        root = Path(pattern)
        paths = sorted(
            p for p in root.rglob("*")
            if p.is_file() and p.name.endswith(SUFFIXES)
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not paths:
            raise ValueError(f"data source {source!r} is a directory without {'/'.join(SUFFIXES)} files")
    elif os.path.isfile(pattern):
        paths, root = [Path(pattern)], Path(pattern).parent
    else:
        raise FileNotFoundError(
            f"data source {source!r} does not exist (expected 'default', a local {'/'.join(SUFFIXES)} file, "
            f"directory or glob, an s3:// prefix, or a hub dataset name)"
        )
    unsupported = [str(p) for p in paths if not p.name.endswith(SUFFIXES)]
    if unsupported:
        raise ValueError(f"data source {source!r}: {unsupported[0]} is not one of {', '.join(SUFFIXES)}")
    return [(p.relative_to(root).as_posix(), p) for p in paths]


def _local_texts(source: str, split: str, shown_as: str) -> Iterator[str]:
    for key, path in local_files(source):
        if path.name.endswith(".txt"):
            if _in_split(key, split):
                yield _read_text_file(path)
            continue
        column = _text_column(path, shown_as)
        for row, text in enumerate(column):
            if text and _in_split(f"{key}#{row}", split):
                yield text


def _text_column(path: Path, shown_as: str) -> list[str]:
    import datasets

    builder = "json" if path.name.endswith(".jsonl") else "parquet"
    table = datasets.load_dataset(builder, data_files=str(path), split="train")
    if TEXT_COLUMN not in table.column_names:
        raise ValueError(
            f"{path} (data source {shown_as!r}) has no {TEXT_COLUMN!r} column; columns found: {table.column_names}"
        )
    return table[TEXT_COLUMN]


# ---------------------------------------------------------------- s3 and the hub


def _fetch_s3(uri: str, cache_dir: str) -> str:
    """A local copy of an s3:// prefix (or single object) under cache_dir; reused while its manifest is unchanged."""
    from rrt_ray import storage

    local = Path(cache_dir).expanduser() / ("s3-" + hashlib.sha256(uri.encode()).hexdigest()[:16])
    if uri.endswith(SUFFIXES):  # maybe a single object rather than a prefix
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            data = None
        if data is not None:
            target = local / uri.rsplit("/", 1)[1]
            storage.write_bytes(str(target), data)
            return str(target)
    remote_manifest = storage.join(uri, storage.MANIFEST_NAME)
    cached_manifest = local / storage.MANIFEST_NAME
    if storage.exists(remote_manifest) and cached_manifest.is_file():
        if storage.read_text(remote_manifest) == cached_manifest.read_text():
            return str(local)
    if not storage.exists(uri):
        raise FileNotFoundError(f"data source {uri!r} does not exist (no objects under that prefix)")
    storage.download_dir(uri, str(local))
    return str(local)


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be used, or None. A 3 s connection probe spares the datasets library's
    ~30 s of retries when there is no network."""
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", HUB_ENDPOINT))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError as error:
        return f"cannot connect to {endpoint.hostname}: {error}"
    return None


def _hub_texts(name: str, split: str) -> Iterator[str]:
    hint = "use 'default', a local file or directory, or an s3:// prefix"
    offline = _hub_offline_reason()
    if offline is not None:
        raise ValueError(
            f"data source {name!r} is not a local path, so it was taken as a hub dataset name, but the "
            f"Hugging Face hub is offline ({offline}): {hint}"
        )
    import datasets

    try:
        rows = iter(datasets.load_dataset(name, split="train", streaming=True))
        first = next(rows)
    except Exception as error:  # network, auth, unknown dataset: one message
        raise ValueError(
            f"data source {name!r} is not a local path and could not be loaded as a hub dataset "
            f"({type(error).__name__}: {error}): {hint}"
        ) from None
    if TEXT_COLUMN not in first:
        raise ValueError(f"hub dataset {name!r} has no {TEXT_COLUMN!r} column; columns found: {sorted(first)}")

    def generate() -> Iterator[str]:
        for row, record in enumerate(itertools.chain([first], rows)):
            text = record[TEXT_COLUMN]
            if text and _in_split(f"{name}#{row}", split):
                yield text

    return generate()
