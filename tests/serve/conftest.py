"""Fixtures for the serving tests: a tiny random Llama and its recursive conversions."""

from __future__ import annotations

import pytest

import rrt_ray  # noqa: F401  (registers the recursive model with the Auto classes)
from rrt_ray.convert import convert_checkpoint
from rrt_ray.testing import tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """{"plain": dir, 2: dir, 3: dir, "seq": dir, "mid": dir}: a 6-layer random Llama and its conversions (LoRA rank 8)."""
    root = tmp_path_factory.mktemp("serve-models")
    tiny_model("llama", num_layers=6).save_pretrained(root / "plain")
    dirs = {"plain": root / "plain"}
    for name, loops, sharing in ((2, 2, "cycle"), (3, 3, "cycle"), ("seq", 3, "sequence"), ("mid", 2, "middle_cycle")):
        convert_checkpoint(str(root / "plain"), str(root / f"rec-{name}"), loops=loops, sharing=sharing, lora_rank=8, progress=False)
        dirs[name] = root / f"rec-{name}"
    return dirs
