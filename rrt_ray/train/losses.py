"""Training losses: next-token cross-entropy and knowledge distillation from a teacher's logits.

All functions take logits already aligned with their targets: position t predicts targets[t]
(the caller shifts). Positions whose target is IGNORE_INDEX count in neither loss.

Distillation divergences, per token, with p_t = softmax(teacher / T), p_s = softmax(student / T):
    forward_kl  KL(p_t || p_s) = sum p_t (log p_t - log p_s)     mode-covering (the paper's choice)
    reverse_kl  KL(p_s || p_t) = sum p_s (log p_s - log p_t)     mode-seeking
    jsd         (KL(p_t || m) + KL(p_s || m)) / 2, m = (p_t + p_s) / 2
each multiplied by T**2 so gradient magnitudes do not shrink as T grows (Hinton et al., 2015).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rrt_ray.registry import Registry

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE. logits (B, T, V), targets (B, T) -> scalar."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


# (student log-probs, teacher log-probs), each (B, T, V) at temperature T -> per-token divergence (B, T)
Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KD_LOSSES: Registry[Divergence] = Registry("KD loss")


@KD_LOSSES.register("forward_kl")
def forward_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return (log_t.exp() * (log_t - log_s)).sum(-1)


@KD_LOSSES.register("reverse_kl")
def reverse_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return (log_s.exp() * (log_s - log_t)).sum(-1)


@KD_LOSSES.register("jsd")
def jsd(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    log_m = torch.logsumexp(torch.stack([log_t, log_s]), dim=0) - math.log(2.0)  # (B, T, V)
    return 0.5 * forward_kl(log_m, log_t) + 0.5 * forward_kl(log_m, log_s)


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean per-token divergence between teacher and student. logits (B, T, V), targets (B, T) -> scalar."""
    divergence = KD_LOSSES.get(kind)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    per_token = divergence(log_s, log_t)  # (B, T)
    mask = (targets != IGNORE_INDEX).to(per_token.dtype)  # (B, T)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0) * temperature**2


def combined_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    kd_weight: float,
    kind: str,
    temperature: float,
    task_loss: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd): loss = (1 - kd_weight) * ce + kd_weight * kd; kd is 0 without a teacher.

    ce is next-token CE of student_logits, or task_loss when given (early exit: the exits' weighted
    loss), so that the returned ce is always the term that is optimised.
    """
    ce = cross_entropy(student_logits, targets) if task_loss is None else task_loss
    if teacher_logits is None or kd_weight == 0:
        return ce, ce, torch.zeros_like(ce)
    kd = kd_divergence(student_logits, teacher_logits, targets, kind, temperature)
    return (1.0 - kd_weight) * ce + kd_weight * kd, ce, kd
