"""rrt_ray.storage against a real S3 protocol server (moto over HTTP on 127.0.0.1)."""

import os
import socket
import time
from pathlib import Path

import pytest

from rrt_ray import storage
from rrt_ray.storage import s3


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"a": 1}\n',
        "weights/model.bin": os.urandom(3000),
        "weights/deep/notes.txt": "caf\u00e9\n".encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_upload_download_roundtrip_with_multipart(s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 * 2**20)
    src = tmp_path / "src"
    files = make_tree(src)
    files["big.bin"] = os.urandom(6 * 2**20 + 17)  # above the threshold: sent as a multipart upload
    (src / "big.bin").write_bytes(files["big.bin"])
    uri = s3_server.uri("runs", "model")

    manifest = storage.upload_dir(str(src), uri)
    assert sorted(manifest["files"]) == sorted(files)
    assert storage.is_published(uri) and storage.exists(uri) and storage.exists(uri + "/config.json")
    assert not storage.exists(s3_server.uri("runs", "other"))
    assert storage.list_dir(uri) == sorted(["big.bin", "config.json", "weights", storage.MANIFEST_NAME])
    assert storage.list_dir(s3_server.uri("nothing")) == []

    dest = tmp_path / "dest"
    storage.download_dir(uri, str(dest))
    got = read_tree(dest)
    assert got.pop(storage.MANIFEST_NAME)
    assert got == files
    assert not list(tmp_path.glob(".dest.partial-*"))  # staging removed


def test_text_roundtrip_and_missing_file(s3_server):
    uri = s3_server.uri("a", "b.txt")
    storage.write_text(uri, "h\u00e9llo")
    assert storage.read_text(uri) == "h\u00e9llo"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.read_text(s3_server.uri("a", "missing.txt"))


def test_checksum_mismatch_is_detected(s3_server, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    uri = s3_server.uri("model")
    storage.upload_dir(str(src), uri)
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="model/weights/model.bin", Body=os.urandom(3000))

    dest = tmp_path / "dest"
    with pytest.raises(storage.ChecksumError, match=r"checksum mismatch downloading s3://.*weights/model.bin \(sha256 differs\)"):
        storage.download_dir(uri, str(dest))
    assert not (dest / "weights" / "model.bin").exists()  # nothing unverified is moved in

    s3_server.client().delete_object(Bucket=s3_server.bucket, Key="model/config.json")
    with pytest.raises(storage.ChecksumError, match=r"config.json \(missing\)"):
        storage.download_dir(uri, str(dest))


def test_latest_moves_only_after_a_complete_upload(s3_server, tmp_path):
    root = s3_server.uri("published")
    assert storage.read_latest(root) is None
    v1 = tmp_path / "v1"
    make_tree(v1)
    assert storage.publish_dir(str(v1), root, "v1") == root + "/v1"
    assert storage.read_latest(root) == root + "/v1"

    v2 = tmp_path / "v2"
    make_tree(v2)
    (v2 / "zz_unreadable.bin").symlink_to(tmp_path / "gone")  # sorted last: fails mid-upload
    with pytest.raises(storage.StorageError, match="cannot read .*zz_unreadable.bin"):
        storage.publish_dir(str(v2), root, "v2")
    assert storage.exists(root + "/v2/config.json")  # the upload had started...
    assert not storage.is_published(root + "/v2")  # ...but never completed
    assert storage.read_latest(root) == root + "/v1"

    (v2 / "zz_unreadable.bin").unlink()
    storage.publish_dir(str(v2), root, "v2")
    assert storage.read_latest(root) == root + "/v2"


def test_missing_credentials_one_clear_error(s3_server, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    uri = s3_server.uri("x")
    expected = f"{uri} needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    with pytest.raises(storage.StorageError) as caught:
        storage.check_s3_access(uri)
    assert str(caught.value) == expected
    with pytest.raises(storage.StorageError, match="needs credentials"):
        storage.upload_dir(str(tmp_path), uri)
    with pytest.raises(storage.StorageError, match="needs credentials"):
        storage.pyarrow_filesystem(uri)


def test_access_check_ok_and_missing_bucket(s3_server, monkeypatch):
    storage.check_s3_access(s3_server.uri("anything"))
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        storage.check_s3_access("s3://no-such-bucket/x")


def test_dead_endpoint_fails_fast_and_names_it(s3_server, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    start = time.monotonic()
    with pytest.raises(storage.StorageError) as caught:
        storage.check_s3_access("s3://some-bucket/prefix")
    assert time.monotonic() - start < 15
    message = str(caught.value)
    assert f"cannot reach S3 endpoint {dead} for bucket 'some-bucket'" in message
    assert "testing" not in message  # never the credentials
    # an explicit endpoint argument overrides the environment
    storage.check_s3_access(s3_server.uri("x"), endpoint=s3_server.endpoint)


def test_copy_dir_between_s3_and_local(s3_server, tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    storage.upload_dir(str(src), s3_server.uri("a"))
    storage.copy_dir(s3_server.uri("a"), s3_server.uri("b"))
    assert storage.is_published(s3_server.uri("b"))
    storage.copy_dir(s3_server.uri("b"), str(tmp_path / "local"))
    got = read_tree(tmp_path / "local")
    got.pop(storage.MANIFEST_NAME)
    assert got == files


def test_pyarrow_filesystem_reads_and_writes_the_bucket(s3_server):
    import pyarrow.fs

    fs, path = storage.pyarrow_filesystem(s3_server.uri("ray", "runs"))
    assert isinstance(fs, pyarrow.fs.S3FileSystem) and path == f"{s3_server.bucket}/ray/runs"
    with fs.open_output_stream(f"{path}/result.json") as out:
        out.write(b'{"ok": true}')
    assert storage.read_text(s3_server.uri("ray", "runs", "result.json")) == '{"ok": true}'
    info = fs.get_file_info(f"{path}/result.json")
    assert info.size == len(b'{"ok": true}')


def test_server_gone_mid_run_leaves_latest_on_the_last_complete_upload(s3_server, tmp_path, monkeypatch):
    """A second server over the same in-process moto backend dies between two publishes."""
    from moto.server import ThreadedMotoServer

    doomed = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    doomed.start()
    host, port = doomed.get_host_and_port()
    root = s3_server.uri("runs")
    make_tree(tmp_path / "v1")
    make_tree(tmp_path / "v2")
    storage.publish_dir(str(tmp_path / "v1"), root, "v1", endpoint=f"http://{host}:{port}")
    doomed.stop()
    with pytest.raises(storage.StorageError, match=f"cannot reach S3 endpoint http://{host}:{port}"):
        storage.publish_dir(str(tmp_path / "v2"), root, "v2", endpoint=f"http://{host}:{port}")
    assert storage.read_latest(root) == root + "/v1"  # read through the surviving server
    assert storage.is_published(root + "/v1") and not storage.is_published(root + "/v2")
