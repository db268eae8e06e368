"""Corpus sources and the deterministic held-out split."""

import json

import pytest

from rrt_ray import data, storage


def test_default_corpus_order_and_split_are_deterministic_and_disjoint():
    files = data.default_corpus_files()
    assert files == data.default_corpus_files()
    keys = [key for key, _ in files]
    assert len(set(keys)) == len(keys) > 500
    assert not any("/test/" in k or "/tests/" in k or "site-packages" in k or "_sysconfigdata" in k for k in keys)
    heldout = {k for k in keys if data.is_heldout(k)}
    assert 0.005 < len(heldout) / len(keys) < 0.04  # ~2%

    train = data.load_texts("default", "train", max_bytes=60_000)
    assert train == data.load_texts("default", "train", max_bytes=60_000)
    assert 50_000 < sum(len(t.encode()) for t in train) <= 60_000
    held = data.load_texts("default", "heldout", max_bytes=60_000)
    assert held and not set(held) & set(data.load_texts("default", "train", max_bytes=400_000))


def test_split_of_a_document_depends_only_on_its_key():
    keys = [f"doc{i}.txt" for i in range(2000)]
    assert [data.is_heldout(k) for k in keys] == [data.is_heldout(k) for k in reversed(keys)][::-1]
    assert 10 < sum(map(data.is_heldout, keys)) < 80


def test_local_txt_dir_glob_and_file(tmp_path):
    docs = {f"part{i:03d}.txt": f"document {i}\n" for i in range(300)}
    (tmp_path / "corpus").mkdir()
    for name, text in docs.items():
        (tmp_path / "corpus" / name).write_text(text)
    train = data.load_texts(str(tmp_path / "corpus"), "train")
    held = data.load_texts(str(tmp_path / "corpus"), "heldout")
    assert sorted(train + held) == sorted(docs.values()) and not set(train) & set(held) and held
    assert data.load_texts(str(tmp_path / "corpus" / "part*.txt"), "all") == [docs[k] for k in sorted(docs)]
    assert data.load_texts(str(tmp_path / "corpus" / "part007.txt"), "all") == ["document 7\n"]


def test_jsonl_and_parquet_rows_are_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"row {i}" for i in range(200)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    pq.write_table(pa.table({"text": rows}), tmp_path / "b.parquet")
    assert data.load_texts(str(tmp_path / "a.jsonl"), "all") == rows
    assert data.load_texts(str(tmp_path / "b.parquet"), "all") == rows
    train = data.load_texts(str(tmp_path / "b.parquet"), "train")
    held = data.load_texts(str(tmp_path / "b.parquet"), "heldout")
    assert len(train) + len(held) == 200 and held


def test_clear_errors(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"has no 'text' column; columns found: \['content', 'id'\]"):
        data.load_texts(str(tmp_path / "c.jsonl"), "all")
    with pytest.raises(FileNotFoundError, match=r"data source '.*missing' does not exist"):
        data.load_texts(str(tmp_path / "missing"), "train")
    with pytest.raises(ValueError, match="hub is offline"):  # conftest sets HF_HUB_OFFLINE=1
        data.load_texts("someone/some-dataset", "train")
    with pytest.raises(ValueError, match="split 'validation' is not one of"):
        data.load_texts("default", "validation")
    (tmp_path / "one.txt").write_text("only one document\n")
    with pytest.raises(ValueError, match="has no '(train|heldout)' documents"):
        data.load_texts(str(tmp_path / "one.txt"), "train" if data.is_heldout("one.txt") else "heldout")


def test_max_bytes_cuts_the_last_document_at_a_line_end(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\nline three\n")
    assert data.load_texts(str(tmp_path / "a.txt"), "all", max_bytes=20) == ["line one\nline two\n"]


def test_s3_prefix_is_downloaded_and_cached(s3_server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"d{i:02d}.txt").write_text(f"text {i}\n")
    storage.upload_dir(str(src), s3_server.uri("corpus"))
    cache = str(tmp_path / "cache")
    texts = data.load_texts(s3_server.uri("corpus"), "all", cache_dir=cache)
    assert texts == [f"text {i}\n" for i in range(50)]
    assert data.load_texts(s3_server.uri("corpus"), "train", cache_dir=cache) == data.load_texts(str(src), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_texts(s3_server.uri("nothing-here"), "all", cache_dir=cache)


def test_debian_doc_sources_join_the_default_corpus_when_present(tmp_path, monkeypatch):
    from rrt_ray.data import corpus

    docs = tmp_path / "_sources"
    (docs / "library").mkdir(parents=True)
    (docs / "library" / "os.rst.txt").write_text(":mod:`os` --- Miscellaneous interfaces\n")
    (docs / "about.rst.txt").write_text("About these documents\n")
    monkeypatch.setattr(corpus, "DOC_SOURCE_DIRS", (str(tmp_path / "absent"), str(docs)))
    keys = [key for key, _ in data.default_corpus_files()]
    assert {"doc/library/os.rst.txt", "doc/about.rst.txt"} <= set(keys)
    everything = data.load_texts("default", "all")
    assert "About these documents\n" in everything
