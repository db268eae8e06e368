"""Stale build locks of DeepSpeed's JIT-compiled ops (shm_comm on CPU, cpu_adam), cleared before a worker builds.

torch's JIT builder serialises builds, and loads of built ops, on a `lock` file in each op's build folder and
waits on it without a timeout. A build killed midway (Ctrl-C, a killed worker, an out-of-memory kill) leaves
the file behind, and from then on every run hangs in `deepspeed.initialize` with its workers idle. A build
takes ~35 s on an idle core and a few minutes under load, and a load holds the lock for milliseconds, so a
lock older than STALE_LOCK_S belongs to a dead build: wait for younger ones, remove that one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

STALE_LOCK_S = 600.0
_POLL_S = 1.0


def extensions_root() -> Path:
    """torch's build root: TORCH_EXTENSIONS_DIR, else its default (the op folders then sit one level lower)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _locks(root: Path) -> list[Path]:
    return [*root.glob("*/lock"), *root.glob("*/*/lock")]


def clear_stale_build_locks(root: Path | None = None, stale_after_s: float = STALE_LOCK_S,
                            log: Callable[[str], None] = print) -> list[Path]:
    """Wait until every build lock under `root` is released or older than `stale_after_s`; remove the old ones
    (naming each). Returns the removed paths."""
    root = root or extensions_root()
    removed: list[Path] = []
    while True:
        young = []
        for lock in _locks(root):
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:  # released meanwhile
                continue
            if age < stale_after_s:
                young.append(lock)
                continue
            try:
                lock.unlink()
            except FileNotFoundError:  # another worker removed it first
                continue
            removed.append(lock)
            log(f"removed a stale DeepSpeed build lock, {age / 60:.0f} min old (a build killed midway): {lock}")
        if not young:
            return removed
        time.sleep(_POLL_S)
