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

    def logits(self, hidden: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> logits (..., V), with `params` standing in for self.params (detached copies)."""
        weight, bias = (params[0], params[1] if len(params) > 1 else None) if params else (self.weight, self.bias)
        logits = F.linear(hidden, weight, bias)
        return logits if not self.softcap else torch.tanh(logits / self.softcap) * self.softcap


def output_head(model: nn.Module) -> OutputHead:
    """The head of a Hugging Face causal LM (or of a converted recursive one, which shares its backbone's)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}'s output head is a {type(head).__name__}, not a Linear: set model.loss_chunk_tokens=0")
    return OutputHead(head.weight, head.bias, getattr(model.config.get_text_config(), "final_logit_softcapping", None))


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> the hidden states (B, T, H) the LM head reads: the decoder's output, final norm applied."""
    decoder = model.backbone.base_model if hasattr(model, "backbone") else model.base_model  # recursive: its backbone's
    return decoder(input_ids=input_ids).last_hidden_state


class _ChunkedHeadLoss(torch.autograd.Function):
    """Forward: the objective summed over token chunks, each chunk's gradients taken at once and accumulated.
    Backward: those gradients times the incoming one (the objective is a sum, so this is exact)."""

    @staticmethod
    def forward(ctx, objective: Objective, head: OutputHead, chunk: int, n_hidden: int, *tensors: torch.Tensor):
        hiddens, params = tensors[:n_hidden], tensors[n_hidden:]
        wants = [t.requires_grad for t in tensors]
        # accumulated in at least fp32 (a bf16 head weight sums many chunks), returned in each input's dtype
        grads = [torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) if want else None for t, want in zip(tensors, wants)]
        loss_sum, logged_sum = None, None
        for start in range(0, hiddens[0].shape[0], chunk):
            part = slice(start, start + chunk)
            with torch.enable_grad():
                leaves = [h[part].detach().requires_grad_(want) for h, want in zip(hiddens, wants)]
                leaves += [p.detach().requires_grad_(want) for p, want in zip(params, wants[n_hidden:])]
                loss, logged = objective([head.logits(h, *leaves[n_hidden:]) for h in leaves[:n_hidden]], part)
                wrt = [leaf for leaf in leaves if leaf.requires_grad]
                got = iter(torch.autograd.grad(loss, wrt, allow_unused=True) if wrt and loss.requires_grad else [None] * len(wrt))
            for i, leaf in enumerate(leaves):
                if leaf.requires_grad and (g := next(got)) is not None:
                    (grads[i][part] if i < n_hidden else grads[i]).add_(g)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            logged_sum = logged.detach() if logged_sum is None else logged_sum + logged.detach()
        ctx.wants, ctx.dtypes = wants, [t.dtype for t in tensors]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.mark_non_differentiable(logged_sum)
        return loss_sum, logged_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_logged: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_loss).to(dtype) if want else None for want, dtype in zip(ctx.wants, ctx.dtypes)]
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
