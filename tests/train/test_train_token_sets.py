"""Issue 14 acceptance: a corpus on S3 (moto over HTTP) tokenised by `jobs/tokenize_corpus.py` on a local Ray
cluster, then trained from: manifest counts match the tokens, the loader's batches equal the in-memory
path's on the same text, Ray Train workers stream the shards from S3, and a run whose worker is killed
mid-way resumes to the uninterrupted run's weights and loss (within 1e-6)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rrt_ray import data, storage

REPO = Path(__file__).resolve().parents[2]
SHARD_TOKENS = 4096  # small shards: the set spans dozens, so blocks, straddling windows and prefetch all occur
DOCS = 240


def _tokenize_main(argv: list[str]) -> tuple[int, str]:
    spec = importlib.util.spec_from_file_location("rrt_job_tokenize_corpus", REPO / "jobs" / "tokenize_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = module.main(argv)
    return code, out.getvalue()


@pytest.fixture
def s3_corpus(s3_server) -> str:
    """DOCS documents on S3: half as .txt objects, half as rows of one .jsonl object."""
    texts = [text[:2000] for text in data.load_texts("default", "all", 4_000_000)][:DOCS]
    assert len(texts) == DOCS
    client = s3_server.client()
    for i, text in enumerate(texts[: DOCS // 2]):
        client.put_object(Bucket=s3_server.bucket, Key=f"corpus/txt/doc{i:03d}.txt", Body=text.encode())
    rows = "".join(json.dumps({"text": text}) + "\n" for text in texts[DOCS // 2:])
    client.put_object(Bucket=s3_server.bucket, Key="corpus/rows.jsonl", Body=rows.encode())
    return s3_server.uri("corpus")


@pytest.mark.slow
def test_tokenize_job_on_s3_then_train_and_resume_from_the_token_set(ray_local, s3_server, s3_corpus, tiny_teacher, make_config,
                                                                     fit_killing_a_worker, weights, tmp_path):
    from transformers import AutoTokenizer

    from rrt_ray.data.token_sets import TokenSetStream, load_manifest
    from rrt_ray.train.trainer import fit

    out = s3_server.uri("tokens", "demo")
    code, printed = _tokenize_main(["--source", s3_corpus, "--tokenizer", tiny_teacher, "--out", out,
                                    "--shard-tokens", str(SHARD_TOKENS), "--workers", "2", "--batch-files", "16"])
    assert code == 0, printed
    assert "tokens/s" in printed
    token_set = storage.read_latest(out)
    manifest = load_manifest(token_set)

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    expected = {}
    for split in ("train", "heldout"):
        texts = data.load_texts(s3_corpus, split, cache_dir=str(tmp_path / "sources"))  # the in-memory path
        expected[split] = data.tokenize_texts(texts, tokenizer)
        entry = manifest["splits"][split]
        assert entry["documents"] == len(texts)
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"]) == len(expected[split])
        assert all(s["tokens"] == SHARD_TOKENS for s in entry["shards"][:-1])
        stream = TokenSetStream(token_set, split, str(tmp_path / "shards"))
        assert np.array_equal(stream[0:len(stream)], expected[split])
    assert len(manifest["splits"]["train"]["shards"]) > 10

    # The loader's batches from the streamed set equal those from the in-memory tokens, rank by rank.
    for rank in range(2):
        from_set = data.ShardedSequenceLoader(TokenSetStream(token_set, "train", str(tmp_path / f"r{rank}")), 32, 4, rank, 2, seed=3)
        in_memory = data.ShardedSequenceLoader(expected["train"], 32, 4, rank, 2, seed=3, block_tokens=SHARD_TOKENS)
        pairs = list(zip(from_set, in_memory))
        assert len(pairs) == len(in_memory) > 100
        assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"]) for a, b in pairs)

    # Training streams the shards from S3; a run whose worker is killed after step 8 ends where this one ends.
    common = [f"data.source={out}", "data.max_bytes=null", "zero.stage=2", "kd.weight=0.5", "optim.max_steps=24",
              "run.checkpoint_every=4", "run.log_every=4", "run.eval_every=0", "run.max_failures=2"]
    straight = fit(make_config(*common, "run.name=set-straight", f"data.cache_dir={tmp_path / 'cache-straight'}"))
    assert straight["step"] == 24 and math.isfinite(straight["loss"]) and math.isfinite(straight["heldout_ppl"])
    assert list((tmp_path / "cache-straight" / "token-sets").rglob("train-*.npy")), "workers did not stream shards from S3"
    resumed = fit_killing_a_worker(make_config(*common, "run.name=set-killed", f"data.cache_dir={tmp_path / 'cache-killed'}"), after_step=8)
    assert resumed["step"] == 24
    assert resumed["data_fingerprint"] == straight["data_fingerprint"]  # no batch lost or repeated
    a, b = weights(straight["export_uri"]), weights(resumed["export_uri"])
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run by {worst}"
    assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-6)
