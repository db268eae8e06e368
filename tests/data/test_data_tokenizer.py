"""Byte-level BPE tokenizer training."""

import pytest

from rrt_ray import data


@pytest.fixture(scope="module")
def texts():
    return data.load_texts("default", "train", max_bytes=150_000)


def test_roundtrip_specials_and_determinism(texts):
    tokenizer = data.train_bpe_tokenizer(texts, 700)
    assert len(tokenizer) == 700
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for sample in ["def f(x):\n    return x  # caf\u00e9 \u2603\n\n\t", "  leading spaces", "\u65e5\u672c\u8a9e"]:
        ids = tokenizer(sample)["input_ids"]
        assert tokenizer.decode(ids) == sample
        assert 1 not in ids and 2 not in ids  # no special token added by encoding
    again = data.train_bpe_tokenizer(texts, 700)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer("import os\nimport sys\n")["input_ids"]) < len("import os\nimport sys\n") / 2  # merges learned


def test_save_and_load_with_auto_tokenizer(texts, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = data.train_bpe_tokenizer(texts[:5], 300)
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    sample = texts[0][:500]
    assert loaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert loaded.decode(loaded(sample)["input_ids"]) == sample
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        data.train_bpe_tokenizer(["x"], 100)
