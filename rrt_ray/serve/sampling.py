"""Per-request sampling settings and the token sampler (greedy, temperature, top-p, per-request seed).

The early-exit confidence is always the model's own distribution (softmax at temperature 1), never the
tempered one: the exit rule asks "is the model sure after this loop?", which a user's temperature
must not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EXIT_MODES: tuple[str, ...] = ("confidence", "speculative", "none")
MAX_LOGPROBS = 20  # OpenAI's limit on logprobs / top_logprobs


@dataclass
class SamplingParams:
    """What one request asks for.

    max_tokens: new tokens to generate at most (finish reason "length").
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_p: nucleus sampling: keep the smallest set of tokens whose probability adds up to >= top_p.
    seed: seeds this request's own generator, so that its samples do not depend on what it is batched with.
    stop: strings that end generation (finish reason "stop"); the text is cut before the first one.
    stop_token_ids: token ids that end generation, in addition to the model's eos unless ignore_eos.
    exit_threshold: early exit after a loop when the exit head's max softmax probability >= this.
        1.0 disables early exit (every token runs max_loops loops); 0.0 exits after the first loop.
    max_loops: loops a generated token may run at most (1..B); None means all B.
    exit_mode: "confidence" (exit when the exit rule's score >= exit_threshold: lossy, fastest),
        "speculative" (lossless self-speculative decoding: the loop-1 exit drafts draft_tokens tokens, the
        deeper loops verify them all in one pass; the output is the full-depth model's) or "none" (full depth).
    draft_tokens: tokens drafted per speculative round (>= 1); with EngineConfig.draft_schedule "heuristic" (the
        default), at most that many: fewer while the full-depth model rejects the drafts.
    logprobs: also return the top-k alternatives of every generated token (0..MAX_LOGPROBS); None: none.
    prompt_logprobs: score the prompt at full depth (log p of each prompt token, None for the first) with
        the top-k alternatives of each (0..MAX_LOGPROBS); None: do not score the prompt. Only with it may
        max_tokens be 0 (score the prompt, generate nothing: OpenAI's echo with max_tokens 0).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    exit_threshold: float = 1.0
    max_loops: int | None = None
    exit_mode: str = "confidence"
    draft_tokens: int = 4
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        least = 0 if self.prompt_logprobs is not None else 1
        if not _is_int(self.max_tokens) or self.max_tokens < least:
            raise ValueError(f"max_tokens must be an integer >= {least}, got {self.max_tokens!r}" + (
                "" if least == 0 else " (0 only when scoring the prompt: echo with logprobs)"))
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers >= 0, got {self.stop_token_ids!r}")
        if not _is_number(self.exit_threshold) or not 0.0 <= self.exit_threshold <= 1.0:
            raise ValueError(f"exit_threshold must be a number in [0, 1], got {self.exit_threshold!r}")
        if self.max_loops is not None and (not _is_int(self.max_loops) or self.max_loops < 1):
            raise ValueError(f"max_loops must be an integer >= 1 or None, got {self.max_loops!r}")
        if self.exit_mode not in EXIT_MODES:
            raise ValueError(f"exit_mode must be one of {', '.join(EXIT_MODES)}, got {self.exit_mode!r}")
        if not _is_int(self.draft_tokens) or self.draft_tokens < 1:
            raise ValueError(f"draft_tokens must be an integer >= 1, got {self.draft_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator of the request's own (seeded, or fresh random) stream."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:  # probs: (V,)
    """Zero every token outside the nucleus (the most probable always stays) and renormalise."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=0) - sorted_probs  # mass of the strictly more probable tokens
    sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from: softmax(logits / temperature), top-p filtered.
    On the CPU: the request's generator lives there (its stream must not depend on the device)."""
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)  # (V,)
    return top_p_filter(probs, params.top_p)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from fp32 logits (V,). Greedy ties go to the lowest id, as torch.argmax and HF do."""
    if params.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(token_probs(logits, params), 1, generator=generator))
