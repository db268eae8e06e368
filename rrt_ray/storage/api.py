"""One storage API for local paths and s3:// URIs (see the package docstring for the contracts)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rrt_ray.storage import manifest as manifests
from rrt_ray.storage import s3
from rrt_ray.storage.manifest import MANIFEST_NAME
from rrt_ray.storage.s3 import StorageError

log = logging.getLogger(__name__)

LATEST_NAME = "latest"


# ---------------------------------------------------------------- paths


def is_remote(uri: str) -> bool:
    """True for s3:// URIs; everything else is a local path (`~` expanded, `file://` accepted)."""
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """uri/part/...: '/'-joined for s3://, os.path.join for local paths (left unexpanded)."""
    if is_remote(uri):
        return "/".join([uri.rstrip("/")] + [part.strip("/") for part in parts if part])
    return os.path.join(uri, *parts)


def _local(uri: str | os.PathLike) -> Path:
    text = str(uri)
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


def _ensure_local_dir(path: Path) -> Path:
    """mkdir -p path, or one clear error naming the ancestor that is not a writable directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError as error:
        ancestor = path
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if ancestor.exists() and not ancestor.is_dir():
            reason = f"{ancestor} is a file, not a directory"
        elif not os.access(ancestor, os.W_OK):
            reason = f"{ancestor} is not writable"
        else:
            reason = error.strerror or str(error)
        raise StorageError(f"cannot create directory {path}: {reason}") from None


def _atomic_write_local(path: Path, data: bytes) -> None:
    """Write tmp in the same directory, fsync, os.replace: readers see the old or the new file, never half."""
    _ensure_local_dir(path.parent)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except PermissionError:
        raise StorageError(f"cannot write {path}: {path.parent} is not writable") from None
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- single objects


def exists(uri: str, *, endpoint: str | None = None) -> bool:
    """Whether uri names a file or a non-empty directory (prefix)."""
    if not is_remote(uri):
        return _local(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = s3.parse_s3(uri)
    client = s3.client(uri, endpoint)
    with s3.translated_errors(uri, endpoint):
        if key:
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
        return listing.get("KeyCount", 0) > 0


def read_bytes(uri: str, *, endpoint: str | None = None) -> bytes:
    if not is_remote(uri):
        path = _local(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{uri} does not exist")
        return path.read_bytes()
    bucket, key = s3.parse_s3(uri)
    client = s3.client(uri, endpoint)
    with s3.translated_errors(uri, endpoint):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Write one file: atomically (tmp + os.replace) locally, one PUT on s3 (atomic by S3's semantics)."""
    if not is_remote(uri):
        _atomic_write_local(_local(uri), data)
        return
    bucket, key = s3.parse_s3(uri)
    client = s3.client(uri, endpoint)
    with s3.translated_errors(uri, endpoint):
        client.put_object(Bucket=bucket, Key=key, Body=data)


def read_text(uri: str, *, endpoint: str | None = None) -> str:
    return read_bytes(uri, endpoint=endpoint).decode("utf-8")


def write_text(uri: str, text: str, *, endpoint: str | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), endpoint=endpoint)


def list_dir(uri: str, *, endpoint: str | None = None) -> list[str]:
    """Names of the immediate children (files and directories) of uri, sorted; [] when it does not exist."""
    if not is_remote(uri):
        path = _local(uri)
        return sorted(child.name for child in path.iterdir()) if path.is_dir() else []
    bucket, key = s3.parse_s3(uri)
    prefix = f"{key}/" if key else ""
    client = s3.client(uri, endpoint)
    names: set[str] = set()
    with s3.translated_errors(uri, endpoint):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.update(item["Prefix"][len(prefix):].rstrip("/") for item in page.get("CommonPrefixes", []))
            names.update(item["Key"][len(prefix):] for item in page.get("Contents", []))
    names.discard("")
    return sorted(names)


def list_files(uri: str, *, endpoint: str | None = None) -> dict[str, int]:
    """{path relative to uri ('/'-separated): size} of every file below uri, recursively; {} when absent."""
    if is_remote(uri):
        return _s3_files(uri, endpoint)
    root = _local(uri)
    if root.is_file():
        return {root.name: root.stat().st_size}
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}


def _s3_files(uri: str, endpoint: str | None) -> dict[str, int]:
    """{relative path: size} of every object under the s3 prefix uri."""
    bucket, key = s3.parse_s3(uri)
    prefix = f"{key}/" if key else ""
    client = s3.client(uri, endpoint)
    files = {}
    with s3.translated_errors(uri, endpoint):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):  # "folder" placeholder objects made by some tools
                    files[item["Key"][len(prefix):]] = item["Size"]
    return files


def _read_manifest(uri: str, endpoint: str | None) -> dict[str, Any] | None:
    manifest_uri = join(uri, MANIFEST_NAME)
    try:
        text = read_text(manifest_uri, endpoint=endpoint)
    except FileNotFoundError:
        return None
    return manifests.loads(text, manifest_uri)


# ---------------------------------------------------------------- directories


def upload_dir(local_dir: str, uri: str, *, endpoint: str | None = None) -> dict[str, Any]:
    """Copy the files of local_dir to uri (s3:// or local), then write the checksum manifest LAST.

    Any manifest already at uri is removed first, so an interrupted upload never looks complete.
    Each file is hashed just before it is sent; the sizes at the destination are checked before the
    manifest is written. Returns the manifest.
    """
    src = _local(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"cannot upload {local_dir}: not a directory")
    if is_remote(uri):
        return _upload_s3(src, uri, endpoint)
    return _upload_local(src, _local(uri))


def _upload_s3(src: Path, uri: str, endpoint: str | None) -> dict[str, Any]:
    bucket, key = s3.parse_s3(uri)
    client = s3.client(uri, endpoint)
    config = s3.transfer_config()
    files = {}
    with s3.translated_errors(uri, endpoint):
        client.delete_object(Bucket=bucket, Key=f"{key}/{MANIFEST_NAME}".lstrip("/"))
        for rel in manifests.local_files(src):
            files[rel] = manifests.file_entry(src / rel)
            client.upload_file(str(src / rel), bucket, f"{key}/{rel}".lstrip("/"), Config=config)
    manifest = {"format": manifests.MANIFEST_FORMAT, "files": files}
    _check_sizes(manifest, _s3_files(uri, endpoint), uri)
    write_text(join(uri, MANIFEST_NAME), manifests.dumps(manifest), endpoint=endpoint)
    return manifest


def _upload_local(src: Path, dest: Path) -> dict[str, Any]:
    _ensure_local_dir(dest)
    same_dir = src.resolve() == dest.resolve()
    if not same_dir:
        (dest / MANIFEST_NAME).unlink(missing_ok=True)
    files = {}
    for rel in manifests.local_files(src):
        files[rel] = manifests.file_entry(src / rel)
        if not same_dir:
            _ensure_local_dir((dest / rel).parent)
            try:
                shutil.copyfile(src / rel, dest / rel)
            except PermissionError:
                raise StorageError(f"cannot write {dest / rel}: {(dest / rel).parent} is not writable") from None
    manifest = {"format": manifests.MANIFEST_FORMAT, "files": files}
    _check_sizes(manifest, {rel: (dest / rel).stat().st_size for rel in files if (dest / rel).is_file()}, str(dest))
    _atomic_write_local(dest / MANIFEST_NAME, manifests.dumps(manifest).encode())
    return manifest


def _check_sizes(manifest: dict[str, Any], stored: dict[str, int], uri: str) -> None:
    wrong = [rel for rel, entry in manifest["files"].items() if stored.get(rel) != entry["size"]]
    if wrong:
        raise StorageError(f"upload to {uri} is incomplete: {', '.join(sorted(wrong)[:5])} missing or truncated")


def download_dir(uri: str, local_dir: str, *, endpoint: str | None = None) -> dict[str, Any] | None:
    """Copy the directory uri (s3:// or local) to local_dir and verify it against its manifest.

    Files land in a staging directory beside local_dir and are moved in only after verification,
    manifest last. A directory without a manifest (uploaded by another tool) is copied unverified,
    with a warning. Raises ChecksumError on a mismatch. Returns the manifest, or None when absent.
    """
    manifest = _read_manifest(uri, endpoint)
    if manifest is not None:
        files = sorted(manifest["files"])
    elif is_remote(uri):
        files = sorted(_s3_files(uri, endpoint))
    else:
        files = manifests.local_files(_local(uri)) if _local(uri).is_dir() else []
    if manifest is None:
        if not files:
            raise FileNotFoundError(f"{uri} does not exist or is empty")
        log.warning("%s has no %s: downloading without checksum verification", uri, MANIFEST_NAME)

    dest = _ensure_local_dir(_local(local_dir))
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        _fetch_files(uri, files, staging, endpoint)
        if manifest is not None:
            manifests.verify_dir(staging, manifest, uri)
            (staging / MANIFEST_NAME).write_text(manifests.dumps(manifest))
        (dest / MANIFEST_NAME).unlink(missing_ok=True)
        for rel in files + ([MANIFEST_NAME] if manifest is not None else []):
            _ensure_local_dir((dest / rel).parent)
            os.replace(staging / rel, dest / rel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _fetch_files(uri: str, files: list[str], staging: Path, endpoint: str | None) -> None:
    if not is_remote(uri):
        src = _local(uri)
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            if (src / rel).is_file():  # a missing file is reported by the verification
                shutil.copyfile(src / rel, staging / rel)
        return
    bucket, key = s3.parse_s3(uri)
    client = s3.client(uri, endpoint)
    config = s3.transfer_config()
    from botocore.exceptions import ClientError

    with s3.translated_errors(uri, endpoint):
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(bucket, f"{key}/{rel}".lstrip("/"), str(staging / rel), Config=config)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise  # a missing file is reported by the verification


def copy_dir(src_uri: str, dst_uri: str, *, endpoint: str | None = None) -> dict[str, Any]:
    """Copy a directory between any two of local / s3://, verified, manifest written last at dst."""
    if not is_remote(src_uri):
        source_manifest = _read_manifest(src_uri, endpoint)
        if source_manifest is not None:  # verify the source before spreading it
            manifests.verify_dir(_local(src_uri), source_manifest, src_uri)
        return upload_dir(src_uri, dst_uri, endpoint=endpoint)
    if not is_remote(dst_uri):
        manifest = download_dir(src_uri, dst_uri, endpoint=endpoint)
        return manifest if manifest is not None else upload_dir(dst_uri, dst_uri)  # manifest for an unverified source
    with tempfile.TemporaryDirectory(prefix="rrt-copy-") as tmp:
        download_dir(src_uri, tmp, endpoint=endpoint)
        return upload_dir(tmp, dst_uri, endpoint=endpoint)


# ---------------------------------------------------------------- publishing


def is_published(uri: str, *, endpoint: str | None = None) -> bool:
    """Whether uri holds a complete upload (its manifest, written last, is present)."""
    return exists(join(uri, MANIFEST_NAME), endpoint=endpoint)


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or name.strip() != name:
        raise ValueError(f"latest name {name!r} must be one non-empty path component without '/' or spaces")


def write_latest(root_uri: str, name: str, *, endpoint: str | None = None) -> None:
    """Point root/latest at root/name: locally tmp + os.replace, on s3 one PUT of the marker object."""
    _check_name(name)
    write_text(join(root_uri, LATEST_NAME), name + "\n", endpoint=endpoint)


def read_latest(root_uri: str, *, endpoint: str | None = None) -> str | None:
    """The URI root/<name> that root/latest names, or None when no marker has been written."""
    try:
        name = read_text(join(root_uri, LATEST_NAME), endpoint=endpoint).strip()
    except FileNotFoundError:
        return None
    _check_name(name)
    return join(root_uri, name)


def publish_dir(local_dir: str, root_uri: str, name: str, *, endpoint: str | None = None) -> str:
    """Upload local_dir to root/name (manifest last), then move root/latest to it; return root/name.

    A failure anywhere raises before the marker moves, so "latest" always names a complete upload.
    """
    _check_name(name)
    target = join(root_uri, name)
    upload_dir(local_dir, target, endpoint=endpoint)
    write_latest(root_uri, name, endpoint=endpoint)
    return target


# ---------------------------------------------------------------- access checks and pyarrow


def check_s3_access(uri: str, *, endpoint: str | None = None) -> None:
    """Fail early (before workers start) on missing credentials, a dead endpoint, a missing bucket or denied access."""
    bucket, key = s3.parse_s3(uri)
    client = s3.client(uri, endpoint)
    with s3.translated_errors(uri, endpoint):
        client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)


def pyarrow_filesystem(uri: str, *, endpoint: str | None = None) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for Ray Train's RunConfig(storage_filesystem=, storage_path=).

    s3://bucket/prefix -> (S3FileSystem with the environment's endpoint and keys, "bucket/prefix");
    a local path -> (LocalFileSystem, absolute path).
    """
    import pyarrow.fs

    if not is_remote(uri):
        return pyarrow.fs.LocalFileSystem(), str(_local(uri).resolve())
    bucket, key = s3.parse_s3(uri)
    s3.require_credentials(uri)
    options: dict[str, Any] = {
        "region": s3.resolve_region(),
        "connect_timeout": s3.CONNECT_TIMEOUT_S,
        "request_timeout": s3.READ_TIMEOUT_S,
        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=s3.MAX_ATTEMPTS),
    }
    credentials = s3.env_credentials()
    if credentials is not None:
        options["access_key"], options["secret_key"] = credentials[:2]
        if credentials[2]:
            options["session_token"] = credentials[2]
    endpoint_url = s3.resolve_endpoint(endpoint)
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        options["scheme"] = parsed.scheme
    return pyarrow.fs.S3FileSystem(**options), f"{bucket}/{key}".rstrip("/")
