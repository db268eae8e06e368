"""Lossless self-speculative decoding for a looped model: the acceptance rules (LayerSkip's idea).

The exit after loop 1 drafts k tokens d_1..d_k, one engine step each. The deeper loops then run once
over all k drafted positions together: their loop-1 hidden states and keys/values are exactly what the
full-depth computation has at loop 1 (loop 1 of a position only reads loop-1 keys of the positions
before it), so nothing is recomputed, and the full-depth distributions p_1..p_k come out of one pass.

    greedy:   keep the longest prefix with d_i == argmax p_i; at the first disagreement emit argmax p_i
    sampled:  keep d_i with probability min(1, p_i(d_i) / q_i(d_i)) (q_i: the draft's distribution);
              at the first rejection emit a sample of norm(max(0, p_i - q_i))    (Leviathan et al. 2023)

Both make every emitted token follow the full-depth model's own (tempered, top-p) distribution, so the
output is the full-depth output, token for token when greedy. When all k drafts are kept nothing more is
emitted (the next round starts from d_k: the position after it has no full-depth distribution yet).

How many tokens a round drafts (`EngineConfig.draft_schedule`, per request):

    constant:   the request's draft_tokens, every round
    heuristic:  start at draft_tokens; +2 after a round whose drafts were all kept, -1 otherwise, within
                [1, draft_tokens] (transformers' "heuristic" schedule for assisted generation, capped)

A draft the full-depth model rejects costs a loop-1 step and a head for nothing, so with a student whose
loop-1 exit rarely agrees with full depth (one not early-exit trained) k fixed drafts cost ~k+1 steps per
token; the heuristic schedule falls to one draft a round, ~the steps of plain full-depth decoding.
"""

from __future__ import annotations

import torch

from rrt_ray.serve.sampling import SamplingParams, token_probs

DRAFT_SCHEDULES: tuple[str, ...] = ("constant", "heuristic")


def next_draft_length(schedule: str, current: int, drafted: int, kept: int, limit: int) -> int:
    """Drafts for a request's next round after one that drafted `drafted` tokens and kept `kept`."""
    if schedule == "constant":
        return limit
    return min(limit, current + 2) if kept == drafted else max(1, current - 1)


def accept_greedy(drafts: list[int], target_logits: torch.Tensor) -> tuple[int, list[int]]:
    """drafts (k,), target_logits (k, V) at full depth -> (drafts kept, tokens to emit)."""
    targets = torch.argmax(target_logits, dim=-1).tolist()  # (k,), ties to the lowest id like argmax
    for i, (draft, target) in enumerate(zip(drafts, targets)):
        if draft != target:
            return i, drafts[:i] + [target]
    return len(drafts), list(drafts)


def accept_sampled(
    drafts: list[int],
    draft_probs: list[torch.Tensor],  # k x (V,) the distributions the drafts were sampled from
    target_logits: torch.Tensor,  # (k, V) full depth
    params: SamplingParams,
    generator: torch.Generator,
) -> tuple[int, list[int]]:
    """The standard speculative acceptance rule; returns (drafts kept, tokens to emit)."""
    for i, (draft, q) in enumerate(zip(drafts, draft_probs)):
        p = token_probs(target_logits[i], params)  # (V,) on the CPU
        u = float(torch.rand((), generator=generator))
        if q[draft] > 0 and u * float(q[draft]) < float(p[draft]):
            continue
        residual = torch.clamp(p - q, min=0.0)  # (V,)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p  # p == q: a rejection has probability 0 then
        return i, drafts[:i] + [int(torch.multinomial(residual, 1, generator=generator))]
    return len(drafts), list(drafts)
