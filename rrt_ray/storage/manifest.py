"""Checksum manifests: `rrt_manifest.json` maps every file of a directory to its sha256 and size.

The manifest is written LAST by an upload, so its presence marks a complete directory, and a
download verifies every file against it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rrt_ray.storage.s3 import StorageError

MANIFEST_NAME = "rrt_manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 4 * 2**20


class ChecksumError(StorageError):
    """A downloaded file does not match the manifest written when its directory was uploaded."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(local_dir: str | Path) -> list[str]:
    """Relative POSIX paths of every file under local_dir (the manifest excluded), sorted.

    Symlinks are followed; a broken one is listed, so that the upload reading it fails loudly.
    """
    root = Path(local_dir)
    files = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        for filename in filenames:
            rel = (Path(dirpath) / filename).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                files.append(rel)
    return sorted(files)


def file_entry(path: Path) -> dict[str, Any]:
    """{"sha256", "size"} of one file to upload; an unreadable file is a StorageError naming it."""
    try:
        return {"sha256": sha256_file(path), "size": path.stat().st_size}
    except OSError as error:
        raise StorageError(f"cannot read {path} for upload: {error.strerror or error}") from None


def dumps(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def loads(text: str, uri: str) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
        files = manifest["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ChecksumError(f"{uri} is not a valid {MANIFEST_NAME} (corrupt upload?)") from None
    return manifest


def verify_dir(local_dir: str | Path, manifest: dict[str, Any], source_uri: str) -> None:
    """Raise ChecksumError naming the files under local_dir that differ from the manifest."""
    root = Path(local_dir)
    bad = []
    for rel, expected in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif path.stat().st_size != expected["size"]:
            bad.append(f"{rel} (size {path.stat().st_size}, expected {expected['size']})")
        elif sha256_file(path) != expected["sha256"]:
            bad.append(f"{rel} (sha256 differs)")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ChecksumError(
            f"checksum mismatch downloading {source_uri}: {shown}; the stored copy is corrupt or was "
            f"modified after upload (re-upload it)"
        )
