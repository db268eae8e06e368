"""Token sets without Ray (quick): shards cut to exact sizes, a split read back as one sliceable stream across
shard boundaries (locally and from moto S3), the loader's batches equal to the in-memory stream's, a corrupt
shard refused by its checksum. The Ray Data job itself: tests/train/test_train_token_sets.py (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rrt_ray import data, storage
from rrt_ray.data.token_sets import FORMAT, MANIFEST, TokenSetStream, _ShardWriter, resolve_token_set

SHARD = 100


def _write_set(root: str, tokens: np.ndarray, pieces: list[int]) -> str:
    """A token set of one split written as the job writes it, fed in runs of the given lengths."""
    target = storage.join(root, "tokens-test")
    writer = _ShardWriter(target, "train", SHARD, np.uint16)
    start = 0
    for length in pieces:
        writer.add(tokens[start:start + length], documents=1)
        start += length
    manifest = {"format": FORMAT, "dtype": "uint16", "shard_tokens": SHARD, "splits": {"train": writer.close()}}
    storage.write_text(storage.join(target, MANIFEST), json.dumps(manifest))
    storage.write_latest(root, "tokens-test")
    return target


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 500, size=1037).astype(np.uint16)  # (1037,): 10 full shards + 37


def test_shards_are_exact_and_the_stream_slices_across_them(tmp_path, tokens):
    uri = _write_set(str(tmp_path / "set"), tokens, [1, 250, 99, 600, 87])  # runs straddle shard edges
    assert resolve_token_set(str(tmp_path / "set")) == uri  # the root's latest names the set
    manifest = json.loads((tmp_path / "set" / "tokens-test" / MANIFEST).read_text())
    assert [s["tokens"] for s in manifest["splits"]["train"]["shards"]] == [SHARD] * 10 + [37]
    stream = TokenSetStream(uri, "train")
    assert len(stream) == len(tokens) and stream.block_tokens == SHARD
    for start, stop in [(0, 1037), (95, 105), (99, 100), (100, 300), (1000, 1037), (250, 251)]:
        assert np.array_equal(stream[start:stop], tokens[start:stop]), (start, stop)


def test_loader_batches_from_a_set_on_s3_equal_the_in_memory_ones(s3_server, tmp_path, tokens):
    uri = _write_set(s3_server.uri("tokens"), tokens, [len(tokens)])
    for rank in range(2):
        from_set = data.ShardedSequenceLoader(TokenSetStream(uri, "train", str(tmp_path / f"cache{rank}")), 16, 2, rank, 2, seed=1)
        in_memory = data.ShardedSequenceLoader(tokens, 16, 2, rank, 2, seed=1, block_tokens=SHARD)
        pairs = list(zip(from_set, in_memory))
        assert len(pairs) == len(in_memory) > 10
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in pairs)


def test_corrupt_shard_is_refused(tmp_path, tokens):
    uri = _write_set(str(tmp_path / "set"), tokens, [len(tokens)])
    shard = tmp_path / "set" / "tokens-test" / "train-00003.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    stream = TokenSetStream(uri, "train")
    assert np.array_equal(stream[0:300], tokens[0:300])  # shards before the corrupt one read fine
    with pytest.raises(storage.ChecksumError, match="train-00003.npy"):
        stream[250:350]
