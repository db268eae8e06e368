"""The training loss from final hidden states, a chunk of tokens at a time: no (B, T, V) logits tensor is ever whole.

With a real vocabulary the logits, not the model, dominate a training step's memory: SmolLM2 (vocab 49,152) at
8 x 128 tokens has 192 MB of student logits, and the whole-batch loss holds the teacher's logits, both
log-softmaxes and their products on top (~1.2 GB at its peak, results/bench_train_memory.md). Here the LM head
and the loss run on `chunk` tokens at a time, and each chunk's gradients (with respect to the hidden states and
the head's parameters) are taken at once, inside the forward pass, as Liger-Kernel's fused linear cross-entropy
does: nothing is recomputed, and what outlives a chunk is its gradients (N x H for the hidden states, the head's
size for its weight). Every loss term is a sum over tokens (train/losses.py, reduction="sum"), so the chunks add
up to exactly the whole batch's loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (logits of each student exit for a chunk, the chunk's slice) -> (loss sum, logged sums): the loss to optimise
Objective = Callable[[list[torch.Tensor], slice], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output head as a function of its parameters: softcap(hidden @ weight.T + bias).

    softcap is Gemma 2's final_logit_softcapping (tanh(x / c) * c), None for the families without it."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    softcap: float | None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> logits (..., V)."""
        return self.cap(F.linear(hidden, self.weight, self.bias))

    def cap(self, z: torch.Tensor) -> torch.Tensor:
        """The logits from the linear output z: softcapped where the family has it."""
        return z if not self.softcap else torch.tanh(z / self.softcap) * self.softcap


def output_head(model: nn.Module) -> OutputHead:
    """The head of a Hugging Face causal LM (or of a converted recursive one, which shares its backbone's)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}'s output head is a {type(head).__name__}, not a Linear: set model.loss_chunk_tokens=0")
    return OutputHead(head.weight, head.bias, getattr(model.config.get_text_config(), "final_logit_softcapping", None))


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> the hidden states (B, T, H) the LM head reads: the decoder's output, final norm applied."""
    decoder = model.backbone.base_model if hasattr(model, "backbone") else model.base_model  # recursive: its backbone's
    # no KV cache: a training forward would otherwise keep every position's keys and values to the end
    return decoder(input_ids=input_ids, use_cache=False).last_hidden_state


class _ChunkedHeadLoss(torch.autograd.Function):
    """Forward: the objective summed over token chunks, each chunk's gradients taken at once and accumulated.
    Backward: those gradients times the incoming one (the objective is a sum, so this is exact).

    Autograd differentiates only from the chunk's pre-activation logits z = hidden @ weight.T + bias onwards; the
    hidden-state and head gradients are then added in place (dz @ weight, dz.T @ hidden, dz summed), so a chunk
    never allocates a head-sized gradient of its own: with a 49,152 x 576 head that is 113 MB fp32 a chunk."""

    @staticmethod
    def forward(ctx, objective: Objective, head: OutputHead, chunk: int, n_hidden: int, *tensors: torch.Tensor):
        hiddens, params = tensors[:n_hidden], tensors[n_hidden:]
        weight, bias = params[0], params[1] if len(params) > 1 else None
        wants = [t.requires_grad for t in tensors]
        # accumulated in at least fp32 (a bf16 head weight sums many chunks), returned in each input's dtype
        grads = [torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) if want else None for t, want in zip(tensors, wants)]
        any_grad = any(wants)
        loss_sum, logged_sum = None, None
        for start in range(0, hiddens[0].shape[0], chunk):
            part = slice(start, start + chunk)
            xs = [h[part].detach() for h in hiddens]
            with torch.enable_grad():
                zs = [F.linear(x, weight.detach(), None if bias is None else bias.detach()).requires_grad_(any_grad) for x in xs]
                loss, logged = objective([head.cap(z) for z in zs], part)
                dzs = torch.autograd.grad(loss, zs, allow_unused=True) if any_grad and loss.requires_grad else [None] * len(zs)
            for i, (x, dz) in enumerate(zip(xs, dzs)):
                if dz is None:
                    continue
                dz = dz.to(grads[i].dtype if wants[i] else torch.promote_types(dz.dtype, torch.float32))
                if wants[i]:
                    grads[i][part].addmm_(dz, weight.detach().to(dz.dtype))
                if wants[n_hidden]:
                    grads[n_hidden].addmm_(dz.T, x.to(dz.dtype))
                if bias is not None and wants[n_hidden + 1]:
                    grads[n_hidden + 1].add_(dz.sum(0))
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            logged_sum = logged.detach() if logged_sum is None else logged_sum + logged.detach()
        ctx.wants, ctx.dtypes = wants, [t.dtype for t in tensors]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.mark_non_differentiable(logged_sum)
        return loss_sum, logged_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_logged: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        # a loss used as is (the common case) takes the saved gradients without a head-sized copy
        unit = bool((grad_loss == 1).all())
        grads = []
        for want, dtype in zip(ctx.wants, ctx.dtypes):
            g = next(saved) if want else None
            grads.append(None if g is None else (g if unit else g * grad_loss).to(dtype))
        return (None, None, None, None, *grads)


def chunked_head_loss(
    hiddens: list[torch.Tensor], head: OutputHead, objective: Objective, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, logged sums) of objective over the logits of `hiddens` (each (N, H), one per student exit),
    `chunk` tokens at a time; differentiable in the hidden states and the head's parameters."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    loss, logged = _ChunkedHeadLoss.apply(objective, head, chunk, len(hiddens), *hiddens, *head.params)
    return loss, logged
