"""Exit logits after every loop, the early-exit loss, and backbone freezing."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rrt_ray.convert import convert_checkpoint
from rrt_ray.models.early_exit import early_exit_loss, exit_weights, freeze_backbone, loop_exit_logits
from rrt_ray.testing import VOCAB, tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ee")
    original = tiny_model("llama")
    original.save_pretrained(root / "src")
    convert_checkpoint(str(root / "src"), str(root / "full"), loops=3, lora_rank="full", progress=False)
    return original, AutoModelForCausalLM.from_pretrained(root / "full").eval(), root


def test_exit_after_loop_b_is_the_original_truncated_there(pair):
    """At full rank, exit b = final norm + head on the original's hidden state after b*K layers."""
    original, model, _ = pair
    tokens = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        exits = loop_exit_logits(model, tokens)
        hidden = original(tokens, output_hidden_states=True).hidden_states  # embeddings + after each layer
        final = model(tokens).logits
    assert len(exits) == 3
    torch.testing.assert_close(exits[-1], final, rtol=0, atol=1e-5)
    for b in (1, 2):
        reference = original.lm_head(original.model.norm(hidden[2 * b]))  # K = 2 layers per loop
        assert (exits[b - 1] - reference).abs().max() < 1e-4
    assert (exits[0] - exits[1]).abs().max() > 1e-2  # the exits are different functions


def test_weight_schedules():
    assert exit_weights("aggressive", 3) == [0.1, 0.1, 1.0]
    assert exit_weights("final", 2) == [0.0, 1.0]
    with pytest.raises(ValueError, match="allowed: aggressive, uniform, final"):
        exit_weights("eager", 2)


def test_loss_weights_the_exits_and_distils_from_the_detached_final_exit():
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (2, 5))
    exits = [torch.randn(2, 5, 11, requires_grad=True) for _ in range(2)]
    loss, ces = early_exit_loss(exits, labels, "aggressive", distill_weight=0.0)
    expected = (0.1 * ces["exit1_ce"] + ces["exit2_ce"]) / 1.1
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    loss, _ = early_exit_loss(exits, labels, "final", distill_weight=1.0)
    loss.backward()
    # the final exit gets only its CE gradient: distillation targets are detached
    ce_only = torch.autograd.grad(early_exit_loss([exits[0].detach(), exits[1]], labels, "final", 0.0)[0], exits[1])[0]
    torch.testing.assert_close(exits[1].grad, ce_only)
    assert exits[0].grad.abs().sum() > 0  # the intermediate exit learns from the final one


def test_early_exit_needs_cycle_sharing(pair, tmp_path):
    _, _, root = pair
    convert_checkpoint(str(root / "src"), str(tmp_path / "seq"), loops=2, sharing="sequence", lora_rank=0, progress=False)
    with pytest.raises(ValueError, match="early exit needs sharing='cycle'"):
        loop_exit_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "seq"), torch.zeros(1, 3, dtype=torch.long))


def test_freeze_backbone_trains_only_what_differs_between_loops(pair):
    _, model, _ = pair
    trainable = set(freeze_backbone(model))
    assert trainable and all(
        name.endswith(("lora_a", "lora_b")) or "layernorm" in name for name in trainable
    ), sorted(trainable)[:5]
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.unrolled_layers.shared[0].self_attn.q_proj.weight.requires_grad
    for param in model.parameters():
        param.requires_grad_(True)


def test_self_distillation_term_is_kl_from_the_final_exit_over_unignored_tokens():
    """Reference written with torch's own kl_div on the kept rows, at temperature 2 with ignored labels."""
    torch.manual_seed(1)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100  # the HF ignore index
    exits = [torch.randn(2, 6, 11) for _ in range(3)]
    loss, ces = early_exit_loss(exits, labels, "final", distill_weight=0.5, temperature=2.0)
    keep = (labels != -100).flatten()
    target = torch.log_softmax(exits[-1].flatten(0, 1)[keep] / 2.0, -1)
    kls = [
        torch.nn.functional.kl_div(torch.log_softmax(e.flatten(0, 1)[keep] / 2.0, -1), target, log_target=True, reduction="batchmean") * 4.0
        for e in exits[:-1]
    ]
    expected = ces["exit3_ce"] + 0.5 * (kls[0] + kls[1]).item() / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
