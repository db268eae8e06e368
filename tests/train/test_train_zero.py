"""Ray Train + DeepSpeed on a local 2-CPU cluster: ZeRO stages, KD, export, checkpoint and resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rrt_ray.train.trainer import fit


def _load(export_dir: str):
    import rrt_ray  # noqa: F401
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("stage, kd_loss", [(1, "reverse_kl"), (3, "jsd")])
def test_zero_stage_trains_with_kd_and_exports(ray_local, make_config, weights, tiny_student, stage, kd_loss):
    cfg = make_config(f"zero.stage={stage}", f"kd.loss={kd_loss}", f"run.name=zero{stage}")
    metrics = fit(cfg)

    assert metrics["step"] == 4 and math.isfinite(metrics["loss"]) and metrics["kd_loss"] > 0
    assert math.isfinite(metrics["heldout_ppl"]) and metrics["tokens_per_s"] > 0
    assert metrics["export_max_logit_diff"] < 1e-5  # the export reproduces the engine's logits
    model = _load(metrics["export_uri"])
    assert model.config.model_type == "rrt_recursive"
    # Shared weights stay shared: 4 shared layers are stored, not 8 unrolled copies.
    before, after = weights(tiny_student), weights(metrics["export_uri"])
    layer_ids = {int(name.split("layers.")[1].split(".")[1]) for name in after if "layers.shared." in name}
    assert layer_ids == {0, 1, 2, 3}
    # It trained: every trainable tensor moved (4 AdamW steps at lr 3e-3 move each weight by ~1e-3 or more).
    assert before.keys() == after.keys()
    unmoved = [name for name in before if torch.equal(before[name], after[name].to(before[name].dtype))]
    assert not unmoved, f"{len(unmoved)} of {len(before)} tensors never changed, e.g. {unmoved[:3]}"
    # The logged loss is the optimised mix: (1 - w) * ce + w * kd, both means over every micro-batch and worker.
    assert metrics["loss"] == pytest.approx(0.5 * metrics["ce_loss"] + 0.5 * metrics["kd_loss"], rel=1e-6)
    assert (Path(metrics["export_uri"]) / "tokenizer.json").is_file()


def test_resume_from_checkpoint_equals_uninterrupted_run(ray_local, make_config, weights):
    """Stop after step 3 (checkpoint), rerun with the same name: same batches, same final weights."""
    common = ["zero.stage=2", "optim.max_steps=6", "kd.loss=forward_kl"]
    straight = fit(make_config(*common, "run.name=straight"))

    stopped = fit(make_config(*common, "run.name=resumed", "run.stop_at=3"))
    assert stopped["stopped_at"] == 3 and "export_uri" not in stopped
    latest = Path(make_config(*common).run.storage) / "resumed" / "latest"
    assert latest.read_text().strip() == "step_00000003"
    resumed = fit(make_config(*common, "run.name=resumed"))

    assert resumed["resumed_from"] == 3 and resumed["step"] == 6
    assert resumed["data_fingerprint"] == straight["data_fingerprint"]  # no batch lost or repeated
    a, b = weights(straight["export_uri"]), weights(resumed["export_uri"])
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"
    assert resumed["heldout_ppl"] == pytest.approx(straight["heldout_ppl"], rel=1e-6)
