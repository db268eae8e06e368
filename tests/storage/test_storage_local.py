"""rrt_ray.storage on local paths: the same contracts as on S3."""

import os
from pathlib import Path

import pytest

from rrt_ray import storage


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"config.json": b"{}\n", "sub/a.bin": os.urandom(1000), "sub/deeper/b.txt": b"b\n"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_roundtrip_with_home_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    files = make_tree(tmp_path / "src")
    assert not storage.is_remote("~/store/m") and storage.is_remote("s3://b/k")
    storage.upload_dir("~/src", "~/store/m")
    assert storage.is_published("~/store/m")
    assert storage.list_dir("~/store/m") == sorted(["config.json", "sub", storage.MANIFEST_NAME])
    storage.download_dir("~/store/m", "~/copy")
    got = read_tree(tmp_path / "copy")
    assert got.pop(storage.MANIFEST_NAME) == (tmp_path / "store" / "m" / storage.MANIFEST_NAME).read_bytes()
    assert got == files
    storage.write_text("~/notes/x.txt", "x")
    assert storage.read_text("~/notes/x.txt") == "x" and storage.exists("~/notes/x.txt")
    assert storage.join("~/a", "b", "c") == os.path.join("~/a", "b", "c")
    assert storage.join("s3://b/k/", "x/", "y") == "s3://b/k/x/y"


def test_checksum_mismatch_is_detected(tmp_path):
    make_tree(tmp_path / "src")
    storage.upload_dir(str(tmp_path / "src"), str(tmp_path / "store"))
    (tmp_path / "store" / "sub" / "a.bin").write_bytes(os.urandom(1000))
    with pytest.raises(storage.ChecksumError, match=r"sub/a.bin \(sha256 differs\)"):
        storage.download_dir(str(tmp_path / "store"), str(tmp_path / "copy"))
    (tmp_path / "store" / "sub" / "deeper" / "b.txt").write_bytes(b"longer\n")
    with pytest.raises(storage.ChecksumError, match=r"b.txt \(size 7, expected 2\)"):
        storage.copy_dir(str(tmp_path / "store"), str(tmp_path / "copy2"))


def test_latest_only_after_complete_upload(tmp_path):
    root = str(tmp_path / "published")
    assert storage.read_latest(root) is None
    make_tree(tmp_path / "v1")
    storage.publish_dir(str(tmp_path / "v1"), root, "v1")
    assert storage.read_latest(root) == os.path.join(root, "v1")

    make_tree(tmp_path / "v2")
    (tmp_path / "v2" / "zz_unreadable").symlink_to(tmp_path / "gone")
    with pytest.raises(storage.StorageError, match="cannot read"):
        storage.publish_dir(str(tmp_path / "v2"), root, "v2")
    assert (tmp_path / "published" / "v2" / "config.json").exists()
    assert not storage.is_published(os.path.join(root, "v2"))
    assert storage.read_latest(root) == os.path.join(root, "v1")
    assert sorted(os.listdir(root)) == ["latest", "v1", "v2"]  # no temporary marker left behind

    with pytest.raises(ValueError, match="one non-empty path component"):
        storage.write_latest(root, "../elsewhere")


def test_unwritable_parent_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    make_tree(tmp_path / "src")
    with pytest.raises(storage.StorageError, match=r"cannot create directory .*afile/out: .*afile is a file, not a directory"):
        storage.upload_dir(str(tmp_path / "src"), str(tmp_path / "afile" / "out"))
    with pytest.raises(storage.StorageError, match="is a file, not a directory"):
        storage.write_latest(str(tmp_path / "afile" / "root"), "v1")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_parent_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(storage.StorageError, match=r"locked is not writable"):
            storage.write_text(str(locked / "sub" / "x.txt"), "x")
    finally:
        locked.chmod(0o700)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        storage.upload_dir(str(tmp_path / "nope"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="does not exist or is empty"):
        storage.download_dir(str(tmp_path / "nope"), str(tmp_path / "out"))


def test_pyarrow_filesystem_local(tmp_path, monkeypatch):
    import pyarrow.fs

    monkeypatch.setenv("HOME", str(tmp_path))
    fs, path = storage.pyarrow_filesystem("~/runs")
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path.resolve() / "runs")
