"""Pretraining the demo teacher: a small Llama with a BPE tokenizer trained on the corpus.

The teacher is the "original model" of the demo, the benchmarks and the quality study. It is cached by
content: the key hashes every setting that changes the trained weights (architecture, data, optimiser,
seed, worker count) and the corpus text itself, and the model is published as `<run.output>/teacher-<key>`
with the root's "latest" marker pointing at it. Asking again for the same key reuses the published
directory without starting Ray.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrt_ray.train.config import TrainConfig, _require


@dataclass
class ArchConfig:
    """The teacher's Llama shape. num_layers must be even and >= 8 (so it can be looped 2 or 4 times)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 640
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 300, f"arch.vocab_size must be >= 300 (bytes + merges), got {self.vocab_size}")
        _require(self.num_layers >= 8 and self.num_layers % 2 == 0, f"arch.num_layers must be even and >= 8, got {self.num_layers}")
        _require(self.hidden_size % self.num_heads == 0, f"arch.hidden_size {self.hidden_size} is not divisible by arch.num_heads {self.num_heads}")
        _require(self.num_heads % self.num_kv_heads == 0, f"arch.num_heads {self.num_heads} is not divisible by arch.num_kv_heads {self.num_kv_heads}")


@dataclass
class PretrainConfig(TrainConfig):
    """TrainConfig plus the architecture; there is no teacher, so kd.weight must be 0."""

    arch: ArchConfig = field(default_factory=ArchConfig)

    def __post_init__(self) -> None:
        _require(self.kd.weight == 0, f"pretraining has no teacher: kd.weight must be 0, got {self.kd.weight}")
        _require(
            self.optim.warmup_steps < self.optim.max_steps,
            f"optim.warmup_steps ({self.optim.warmup_steps}) must be < optim.max_steps ({self.optim.max_steps})",
        )

    def train_config(self, student: str) -> TrainConfig:
        data = self.to_dict()
        data.pop("arch")
        data["model"]["student"] = student
        return TrainConfig.from_dict(data)


def content_key(cfg: PretrainConfig, corpus_digest: str) -> str:
    """Hash of everything that determines the trained weights."""
    settings = cfg.to_dict()
    settings["data"].pop("cache_dir")
    settings["run"] = {"seed": cfg.run.seed, "num_workers": cfg.run.num_workers}
    settings.pop("model")
    blob = json.dumps(settings, sort_keys=True) + corpus_digest
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def corpus_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return digest.hexdigest()


def init_model_dir(cfg: PretrainConfig, tokenizer: Any, out: Path) -> Path:
    """A randomly initialised Llama (seeded) plus its tokenizer, saved as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = cfg.arch
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # a small corpus can yield fewer merges than arch.vocab_size
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        tie_word_embeddings=False,  # no aliased Parameters: DeepSpeed checkpoints and PEFT merges break on them
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.run.seed)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pretrain_teacher(cfg: PretrainConfig, log: Any = print) -> str:
    """Train (or reuse) the teacher; return the URI of its published Hugging Face directory."""
    from rrt_ray import data, storage
    from rrt_ray.train.prepare import warm_token_cache
    from rrt_ray.train.trainer import fit

    texts = data.load_texts(cfg.data.source, cfg.data.train_split, cfg.data.max_bytes)
    key = content_key(cfg, corpus_digest(texts))
    name = f"teacher-{key}"
    published = storage.join(cfg.run.output, name)
    if storage.is_published(published):
        log(f"teacher {name} already trained: reusing {published}")
        return published

    workdir = Path(cfg.run.workdir).expanduser().resolve() / name
    shutil.rmtree(workdir, ignore_errors=True)
    tokenizer = data.train_bpe_tokenizer(texts, cfg.arch.vocab_size)
    init_dir = init_model_dir(cfg, tokenizer, workdir / "init")
    log(f"pretraining {name}: {cfg.arch.num_layers} layers, hidden {cfg.arch.hidden_size}, vocab {cfg.arch.vocab_size}")
    train_cfg = cfg.train_config(str(init_dir))
    train_cfg.run.name = name
    warm_token_cache(train_cfg)
    metrics = fit(train_cfg)
    shutil.rmtree(workdir, ignore_errors=True)
    return metrics["export_uri"]
