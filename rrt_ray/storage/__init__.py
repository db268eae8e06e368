"""One storage API for local paths and s3:// URIs.

- `upload_dir` / `download_dir` / `copy_dir` move whole directories (models, checkpoints, corpora)
  between local disk and S3 (boto3, multipart above 64 MiB). Uploads write a checksum manifest
  (`rrt_manifest.json`: file -> sha256, size) LAST; downloads verify every file against it and raise
  `ChecksumError` on a mismatch.
- `publish_dir(local, root, name)` uploads to root/name and only then moves the atomic "latest"
  marker (root/latest, holding the name): a failed or interrupted upload never moves it. Locally the
  marker is written to a temporary file and `os.replace`d; on S3 it is a single PUT after the manifest.

      root/
        latest            -> "v2"
        v1/ ... rrt_manifest.json
        v2/ ... rrt_manifest.json

- Credentials and endpoint come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
  AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), overridable per call with `endpoint=`;
  path-style addressing, bounded retries (a dead endpoint fails in seconds). `check_s3_access(uri)`
  lets a job fail before starting workers. Credentials are never logged.
- `pyarrow_filesystem(uri)` gives Ray Train's RunConfig its (storage_filesystem, storage_path).
"""

from rrt_ray.storage.api import (
    LATEST_NAME,
    check_s3_access,
    copy_dir,
    download_dir,
    exists,
    is_published,
    is_remote,
    join,
    list_dir,
    list_files,
    publish_dir,
    pyarrow_filesystem,
    read_bytes,
    read_latest,
    read_text,
    upload_dir,
    write_bytes,
    write_latest,
    write_text,
)
from rrt_ray.storage.manifest import MANIFEST_NAME, ChecksumError
from rrt_ray.storage.s3 import StorageError

__all__ = [
    "LATEST_NAME",
    "MANIFEST_NAME",
    "ChecksumError",
    "StorageError",
    "check_s3_access",
    "copy_dir",
    "download_dir",
    "exists",
    "is_published",
    "is_remote",
    "join",
    "list_dir",
    "list_files",
    "publish_dir",
    "pyarrow_filesystem",
    "read_bytes",
    "read_latest",
    "read_text",
    "upload_dir",
    "write_bytes",
    "write_latest",
    "write_text",
]
