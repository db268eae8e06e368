"""boto3 plumbing for s3:// URIs.

- Credentials, endpoint and region come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
  AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), the endpoint optionally overridden
  by an explicit argument.
- Path-style addressing, so MinIO, moto and other self-hosted servers work without DNS tricks.
- Bounded retries and timeouts: a dead endpoint fails in seconds, not minutes.
- Every botocore failure is translated into one `StorageError` naming the endpoint, bucket and URI;
  credentials never appear in a message or a log line.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CREDENTIALS_HINT = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
DEFAULT_REGION = "us-east-1"
# Connection refused or a blackholed host: 3 attempts x 3 s connect timeout plus standard-mode backoff
# (at most 1 s, then 2 s) keeps the worst case near 15 s; a refused connection fails in ~3 s.
MAX_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0
MULTIPART_THRESHOLD = 64 * 2**20  # files above this are uploaded in parts (boto3 TransferConfig)


class StorageError(RuntimeError):
    """A storage operation failed for a reason the user can act on (credentials, endpoint, path)."""


def parse_s3(uri: str) -> tuple[str, str]:
    """("bucket", "key/prefix") of an s3:// URI; the key has no leading or trailing slash."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket name (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    """The explicit endpoint, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else None (AWS itself)."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def resolve_region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or DEFAULT_REGION


def describe_endpoint(endpoint: str | None) -> str:
    return endpoint or f"the AWS default endpoint (region {resolve_region()})"


def env_credentials() -> tuple[str, str, str | None] | None:
    """(key id, secret, session token or None) from the environment, or None."""
    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    return (key_id, secret, os.environ.get("AWS_SESSION_TOKEN") or None) if key_id and secret else None


def _other_credentials_configured() -> bool:
    """A profile, web identity (IRSA) or container role that boto3 resolves itself."""
    if any(os.environ.get(name) for name in (
        "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    )):
        return True
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    return Path(shared).expanduser().is_file()


def require_credentials(uri: str) -> None:
    """Raise the one clear message when no credentials are configured for an s3:// URI."""
    if env_credentials() is None and not _other_credentials_configured():
        raise StorageError(f"{uri} needs credentials: {CREDENTIALS_HINT}")


def client(uri: str, endpoint: str | None = None) -> Any:
    """A boto3 S3 client for uri (credentials checked first); cached per endpoint and credentials."""
    require_credentials(uri)
    return _cached_client(resolve_endpoint(endpoint), resolve_region(), env_credentials())


@functools.lru_cache(maxsize=8)
def _cached_client(endpoint: str | None, region: str, credentials: tuple[str, str, str | None] | None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
    )
    keys = {}
    if credentials is not None:
        keys = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1], "aws_session_token": credentials[2]}
    session = boto3.session.Session(**keys)  # one session per client: boto3 sessions are not thread-safe
    return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, num_download_attempts=MAX_ATTEMPTS)


@contextlib.contextmanager
def translated_errors(uri: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn botocore/boto3 failures into one StorageError naming the endpoint and bucket."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    where = describe_endpoint(resolve_endpoint(endpoint))
    bucket = parse_s3(uri)[0]
    try:
        yield
    except NoCredentialsError:
        raise StorageError(f"{uri} needs credentials: {CREDENTIALS_HINT}") from None
    except ClientError as error:
        raise _client_error(error, uri, bucket, where) from None
    except S3UploadFailedError as error:
        raise StorageError(f"upload to {uri} (bucket {bucket!r} at {where}) failed: {error}") from None
    except BotoCoreError as error:  # connection refused, timeouts, closed connections
        raise StorageError(
            f"cannot reach S3 endpoint {where} for bucket {bucket!r} ({uri}): {type(error).__name__}: {error}"
        ) from None


def _client_error(error: Any, uri: str, bucket: str, where: str) -> Exception:
    code = str(error.response.get("Error", {}).get("Code", ""))
    if code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(f"{uri} does not exist (bucket {bucket!r} at {where})")
    if code == "NoSuchBucket":
        return StorageError(f"bucket {bucket!r} does not exist at {where} ({uri})")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
        return StorageError(f"access to {uri} denied by {where} ({code}): check the credentials and the bucket policy")
    return StorageError(f"S3 request for {uri} (bucket {bucket!r} at {where}) failed: {code or error}")
