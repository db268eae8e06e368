"""Token streams, their cache, and packing into seq_len + 1 windows."""

import numpy as np
import pytest

from rrt_ray import data


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_bpe_tokenizer(data.load_texts("default", "train", max_bytes=50_000), 512)


def test_stream_has_eos_after_every_document(tokenizer):
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    stream = data.tokenize_texts(texts, tokenizer)
    assert stream.dtype == np.uint16
    eos = tokenizer.eos_token_id
    assert stream[-1] == eos and int((stream == eos).sum()) == 3
    documents = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
    assert [tokenizer.decode(doc[:-1].tolist()) for doc in documents] == texts
    assert data.token_dtype(65_536) == np.uint16 and data.token_dtype(65_537) == np.uint32


def test_cache_is_keyed_by_content_and_tokenizer(tokenizer, tmp_path):
    texts = data.load_texts("default", "heldout", max_bytes=20_000)
    first = data.tokenize_cached(texts, tokenizer, str(tmp_path))
    assert np.array_equal(first, data.tokenize_texts(texts, tokenizer))
    files = list(tmp_path.glob("tokens-*.npy"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    assert np.array_equal(data.tokenize_cached(texts, tokenizer, str(tmp_path)), first)
    assert files[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    data.tokenize_cached(texts[:-1], tokenizer, str(tmp_path))
    other = data.train_bpe_tokenizer(texts, 300)
    data.tokenize_cached(texts, other, str(tmp_path))
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 3
    assert not list(tmp_path.glob(".*tmp*"))
