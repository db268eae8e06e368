"""What `rrt convert` and `rrt import` share about their output: the storage dtypes, the OUT check and the atomic write."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

# Storage dtypes of a written model (`--dtype`); CPUs here compute in fp32, bf16 is for storage and GPUs.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_out(out: str, overwrite: bool) -> Path:
    """OUT resolved, or a ValueError naming it: not a file, empty unless overwrite, and writable."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"OUT {out!r} is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"OUT {out!r} exists and is not empty; pass --overwrite to replace it")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"OUT {out!r} is not writable ({parent} is a file, not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"OUT {out!r} is not writable (no write permission on {parent})")
    return path


def write_atomically(out_path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary sibling of OUT, which then replaces OUT; on any failure OUT is untouched."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        write(tmp)
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(tmp, out_path)
    except BaseException:  # any failure, Ctrl-C included: drop the partial copy, then re-raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise
