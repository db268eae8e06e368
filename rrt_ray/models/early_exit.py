"""Early exit after every loop: exit logits, loss weighting schedules, and post-training.

The exit after loop b applies the model's own final norm and LM head (shared by every exit) to the
hidden state at the end of loop b. CYCLE sharing only: SEQUENCE repeats each layer B times in a row,
so no point before the last layer has run the whole block.

Loss (the paper's early-exit post-training): sum_b w_b CE(exit_b) / sum_b w_b, plus
self-distillation of every intermediate exit from the detached final exit, KL(final || exit_b).
Schedules for w: "aggressive" = 0.1 on intermediate exits, 1.0 on the last (the paper's choice);
"uniform" = 1 everywhere; "final" = the last exit only (plain uptraining).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rrt_ray.models.arch import arch_spec
from rrt_ray.models.layer_map import SHARING_MODES
from rrt_ray.models.lora import RelaxedLoRALinear
from rrt_ray.models.per_depth import PerDepth
from rrt_ray.models.recursive import RecursiveForCausalLM
from rrt_ray.train.head_loss import output_head
from rrt_ray.train.losses import cross_entropy, kd_divergence

EXIT_SCHEDULES: dict[str, Callable[[int], list[float]]] = {
    "aggressive": lambda loops: [0.1] * (loops - 1) + [1.0],
    "uniform": lambda loops: [1.0] * loops,
    "final": lambda loops: [0.0] * (loops - 1) + [1.0],
}


def exit_weights(schedule: str, loops: int) -> list[float]:
    if schedule not in EXIT_SCHEDULES:
        raise ValueError(f"unknown early-exit schedule {schedule!r}; allowed: {', '.join(EXIT_SCHEDULES)}")
    return EXIT_SCHEDULES[schedule](loops)


def final_norm(model: RecursiveForCausalLM) -> torch.nn.Module:
    """The norm before the LM head, where the family's ArchSpec says it is (every exit head reuses it)."""
    return arch_spec(model.config.text_config.model_type).module(model.backbone, "final_norm")


def loop_exit_hidden(model: RecursiveForCausalLM, input_ids: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """The hidden states (B, L, H) each exit's LM head reads (final norm applied), shallowest first."""
    if not SHARING_MODES.get(model.config.sharing).loop_exits:
        raise ValueError(f"early exit needs sharing='cycle' (loops end between blocks), got {model.config.sharing!r}")
    layers = model.unrolled_layers
    layers.loop_outputs = []
    try:
        model.backbone.base_model(input_ids=input_ids, **kwargs)
        hidden = layers.loop_outputs
    finally:
        layers.loop_outputs = None
    norm = final_norm(model)
    return [norm(h) for h in hidden]


def loop_exit_logits(model: RecursiveForCausalLM, input_ids: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Logits (B, L, V) of the exit after each loop, shallowest first; the last equals model(...).logits."""
    head = output_head(model)
    return [head.logits(h) for h in loop_exit_hidden(model, input_ids, **kwargs)]


def early_exit_loss(
    exit_logits: list[torch.Tensor],  # [(B, L, V)] per loop, shallowest first
    labels: torch.Tensor,  # (B, L) next-token targets, IGNORE_INDEX ignored
    schedule: str = "aggressive",
    distill_weight: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted CE over exits + self-distillation from the detached final exit. Returns (loss, per-exit CE)."""
    weights = exit_weights(schedule, len(exit_logits))
    ces = [cross_entropy(logits, labels, reduction) for logits in exit_logits]
    loss = sum(w * ce for w, ce in zip(weights, ces)) / sum(weights)
    if distill_weight > 0 and len(exit_logits) > 1:
        final = exit_logits[-1].detach()  # the teacher of every intermediate exit: KL(final || exit_b)
        kd = sum(kd_divergence(logits, final, labels, "forward_kl", temperature, reduction) for logits in exit_logits[:-1])
        loss = loss + distill_weight * kd / (len(exit_logits) - 1)
    return loss, {f"exit{b + 1}_ce": ce.item() for b, ce in enumerate(ces)}


def freeze_backbone(model: RecursiveForCausalLM) -> list[str]:
    """Early-exit post-training: freeze shared weights, embeddings and head; train LoRA and per-depth
    norms and biases, the parts that differ between loops. Returns the trainable parameter names."""
    trainable = []
    for name, param in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        per_depth = (
            isinstance(module, PerDepth)
            or name.endswith(("lora_a", "lora_b"))
            or (isinstance(module, RelaxedLoRALinear) and name.endswith("bias") and param.dim() == 2)
        )
        param.requires_grad_(per_depth)
        if per_depth:
            trainable.append(name)
    if not trainable:
        raise ValueError("nothing left to train with a frozen backbone: convert with --lora-rank > 0 or per-depth norms")
    return trainable
