"""Early-exit training in the uptraining loop: exits after every loop, aggressive weighting, and the
post-training mode that freezes the backbone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rrt_ray.train.config import TrainConfig
from rrt_ray.train.trainer import fit


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_early_exit_post_training_moves_only_the_per_depth_parts(ray_local, make_config, tiny_student):
    cfg = make_config("zero.stage=2", "early_exit.enabled=true", "early_exit.freeze_backbone=true", "run.name=ee-post")
    metrics = fit(cfg)
    assert metrics["step"] == 4 and math.isfinite(metrics["loss"]) and metrics["export_max_logit_diff"] < 1e-5
    before, after = _weights(tiny_student), _weights(metrics["export_uri"])
    moved = {name for name in before if not torch.equal(before[name], after[name].to(before[name].dtype))}
    assert moved, "nothing trained"
    assert all(name.endswith(("lora_a", "lora_b")) or "layernorm" in name for name in moved), sorted(moved)[:5]
    assert not any("embed_tokens" in name or name.endswith("q_proj.weight") for name in moved)


def test_bad_early_exit_settings_are_rejected_with_the_allowed_values(make_config):
    with pytest.raises(ValueError, match="early_exit.schedule 'eager' is not one of aggressive, uniform, final"):
        make_config("early_exit.enabled=true", "early_exit.schedule=eager")
    with pytest.raises(ValueError, match="freeze_backbone needs early_exit.enabled=true"):
        make_config("early_exit.freeze_backbone=true")
    with pytest.raises(ValueError, match="early_exit needs model.sharing=cycle"):
        TrainConfig.from_dict({"model": {"teacher": "t", "sharing": "sequence"}, "kd": {"weight": 0.0}, "early_exit": {"enabled": True}})
