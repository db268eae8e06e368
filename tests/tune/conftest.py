"""Fixtures for the sweep tests: a tiny random Llama teacher with a trained BPE tokenizer, and a sweep
config builder with small, fast settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

CORPUS_BYTES = 200_000
TINY_LAYERS = 4


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A 4-layer random Llama (hidden 64; projections 64x64 and 64x128) with a 512-token BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rrt_ray import data

    out = tmp_path_factory.mktemp("teacher")
    tokenizer = data.train_bpe_tokenizer(data.load_texts("default", "train", CORPUS_BYTES), 512)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def sweep_config(tmp_path, tiny_teacher):
    """Write a tiny sweep config (2,048 tokens a trial, 2 milestones); returns (path, config dict)."""

    def build(space: dict, **sections) -> tuple[str, dict]:
        config = {
            "train": {
                "model": {"teacher": tiny_teacher, "loops": 2},
                "data": {"source": "default", "max_bytes": CORPUS_BYTES, "seq_len": 32, "micro_batch_size": 4,
                         "eval_batches": 2, "cache_dir": str(tmp_path / "tokens")},
                "optim": {"warmup_steps": 1, "lr": 3.0e-3},
                "kd": {"weight": 0.5},
                "run": {"num_workers": 2, "workdir": str(tmp_path / "work")},
            },
            "space": space,
            "budget": {"tokens": 2048, "milestones": 2},
            "asha": {"grace_milestones": 1},
            "sweep": {"name": "tiny", "storage": str(tmp_path / "runs"), "output": str(tmp_path / "out")},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        path = tmp_path / "tune_tiny.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path), config

    return build
