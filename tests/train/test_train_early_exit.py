"""Early-exit training in the uptraining loop: exits after every loop, aggressive weighting, and the
post-training mode that freezes the backbone."""

from __future__ import annotations

import math
import pytest
import torch

from rrt_ray.train.config import TrainConfig
from rrt_ray.train.trainer import fit


def test_early_exit_post_training_moves_only_the_per_depth_parts(ray_local, make_config, tiny_student, weights):
    cfg = make_config("zero.stage=2", "early_exit.enabled=true", "early_exit.freeze_backbone=true", "run.name=ee-post")
    metrics = fit(cfg)
    assert metrics["step"] == 4 and math.isfinite(metrics["loss"]) and metrics["export_max_logit_diff"] < 1e-5
    # The logged terms are what is optimised: the exits' loss stands where plain CE would.
    assert metrics["loss"] == pytest.approx(0.5 * metrics["ce_loss"] + 0.5 * metrics["kd_loss"], rel=1e-6)
    assert metrics["final_ce_loss"] != pytest.approx(metrics["ce_loss"], rel=1e-3)
    before, after = weights(tiny_student), weights(metrics["export_uri"])
    moved = {name for name in before if not torch.equal(before[name], after[name].to(before[name].dtype))}
    assert moved, "nothing trained"
    assert all(name.endswith(("lora_a", "lora_b")) or "layernorm" in name for name in moved), sorted(moved)[:5]
    assert not any("embed_tokens" in name or name.endswith("q_proj.weight") for name in moved)


def test_bad_early_exit_settings_are_rejected_with_the_allowed_values(make_config):
    with pytest.raises(ValueError, match="early_exit.schedule 'eager' is not one of aggressive, uniform, final"):
        make_config("early_exit.enabled=true", "early_exit.schedule=eager")
    with pytest.raises(ValueError, match="freeze_backbone needs early_exit.enabled=true"):
        make_config("early_exit.freeze_backbone=true")
    with pytest.raises(ValueError, match=r"early_exit needs a sharing mode with exits between loops \(cycle\), got 'sequence'"):
        TrainConfig.from_dict({"model": {"teacher": "t", "sharing": "sequence"}, "kd": {"weight": 0.0}, "early_exit": {"enabled": True}})


@pytest.mark.parametrize("early_exit", [False, True])
def test_micro_batch_loss_terms_add_up_to_the_optimised_loss(make_config, tmp_path, early_exit):
    """No Ray: the loop's loss step on the tiny models; its logged terms must compose the loss it returns."""
    from rrt_ray import data
    from rrt_ray.train.loop import load_models, micro_batch_loss

    cfg = make_config(f"early_exit.enabled={str(early_exit).lower()}", "kd.weight=0.3")
    tokenizer, model, teacher = load_models(cfg, tmp_path)
    tokens = data.tokenize_texts(data.load_texts("default", "heldout", 20_000), tokenizer)
    batch = next(data.iter_eval_batches(tokens, 16, 2))
    terms = micro_batch_loss(model, teacher, batch, cfg)
    assert terms["loss"].item() == pytest.approx(0.7 * terms["ce_loss"].item() + 0.3 * terms["kd_loss"].item(), rel=1e-6)
    assert ("final_ce_loss" in terms) == early_exit
    if early_exit:  # the exits' loss replaces the final CE: it includes the shallower, worse exit
        assert terms["ce_loss"].item() != pytest.approx(terms["final_ce_loss"].item(), rel=1e-3)
