"""Training losses: next-token cross-entropy and knowledge distillation from a teacher's logits.

All functions take logits already aligned with their targets: position t predicts targets[t]
(the caller shifts). Positions whose target is IGNORE_INDEX count in neither loss. reduction="mean"
averages over the counted positions; "sum" adds them up, so that a batch split into chunks of tokens
(train/head_loss.py) sums its chunks and divides once by the batch's count: the same loss, exactly.

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


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to fp32 for the softmax; fp32 and fp64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token CE. logits (..., V), targets (...) -> scalar."""
    return F.cross_entropy(_upcast(logits.flatten(0, -2)), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


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
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-token divergence between teacher and student, reduced. logits (..., V), targets (...) -> scalar."""
    divergence = KD_LOSSES.get(kind)
    log_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)  # (B, T, V)
    log_t = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)  # (B, T, V)
    per_token = divergence(log_s, log_t)  # (...)
    mask = (targets != IGNORE_INDEX).to(per_token.dtype)  # (...)
    total = (per_token * mask).sum() * temperature**2
    return total if reduction == "sum" else total / mask.sum().clamp_min(1.0)


def combined_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    kd_weight: float,
    kind: str,
    temperature: float,
    task_loss: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd): loss = (1 - kd_weight) * ce + kd_weight * kd; kd is 0 without a teacher.

    ce is next-token CE of student_logits, or task_loss when given (early exit: the exits' weighted
    loss), so that the returned ce is always the term that is optimised.
    """
    ce = cross_entropy(student_logits, targets, reduction) if task_loss is None else task_loss
    if teacher_logits is None or kd_weight == 0:
        return ce, ce, torch.zeros_like(ce)
    kd = kd_divergence(student_logits, teacher_logits, targets, kind, temperature, reduction)
    return (1.0 - kd_weight) * ce + kd_weight * kd, ce, kd
