"""The serving engine: continuous batching, early exit and continuous depth-wise batching (plain Python).

Notable features:
- Iteration-level scheduling: requests join and leave at every step; prompts are prefilled in chunks
  under a per-step token budget, next to the decode tokens of other requests.
- One step runs ONE LOOP of the shared block over every token in flight. For a recursive model with
  B loops (CYCLE sharing) a token needs up to B steps; tokens at different depths share each layer call,
  each with its own depth's LoRA and norms (per-token depth tensor -> `rrt_ray.kernels.multi_lora`):

      step s:    req A tok 7 @ loop 2 | req B tok 3 @ loop 1 | req C prompt[0:40] @ loop 1 | req D tok 5 @ loop 1
      step s+1:  req A tok 8 @ loop 1 | req B tok 3 @ loop 2 | req C prompt[0:40] @ loop 2 | req D tok 6 @ loop 1
                 (A's token 7 and D's token 5 exited; their slots were refilled at once by their next tokens)

- Early exit after every loop: exit head = the final norm + the shared LM head on the hidden state after
  that loop; a token exits when max softmax prob >= its request's exit_threshold (1.0: never early,
  0.0: always after loop 1) or when it has run the request's max_loops.
- Keys/values an exited token leaves missing at deeper loops are FILLED so that later tokens at those
  loops have something to attend to. Default "propagate" (CALM, Schuster et al. 2022): the exited hidden
  state is copied up to every skipped position and run through that position's own pre-attention norm and
  k/v projections (with that depth's LoRA) and rotary. It is the exact computation a full-depth forward would
  do if the exited token's state stopped changing, and it costs only the k/v (and q/o) projections of the
  skipped positions. Option "share": copy the exit loop's keys/values into the deeper loops' slots (no
  compute; the keys then come from a shallower layer's projections, which the model was not trained on
  unless trained for KV sharing).
- Per-request exit_mode: "confidence" (above; lossy), "none" (full depth) or "speculative": lossless
  self-speculative decoding (rrt_ray.serve.speculative). The loop-1 exit drafts draft_tokens tokens, one
  step each (draft rows, loop 1); then the drafted positions run the deeper loops together as one unit
  (verify rows), reusing their loop-1 hidden states and keys/values, and the longest prefix the full-depth
  model agrees with is kept. Draft rows of one request share steps with verify rows of others.
- Exit rules (`EngineConfig.exit_rule`): "confidence" needs the exit head's logits for every token it
  scores; "classifier" (rrt_ray.serve.exit_rules) scores the hidden state with a tiny learned probe and
  runs the head only for the tokens that leave.
- Plain Hugging Face models run through the same engine (one "loop" of all N layers, no exit), so both
  sides of a comparison share the scheduler, the cache and the attention.
- Everything in a layer except attention over the cache is the HF layer's own code; the attention is
  `rrt_ray.serve.kv_cache.engine_attention` (SDPA over a KV pool with one slot per unrolled position).

The engine is not thread-safe: one thread calls add_request / abort / step (rrt_ray.serve.app does so).
"""

from __future__ import annotations

import itertools
import numbers
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from rrt_ray.serve.exit_rules import EXIT_RULES, ExitClassifier
from rrt_ray.serve.kv_cache import KVPool, Span, StepBatch
from rrt_ray.serve.runner import WEIGHT_MODES, ModelRunner
from rrt_ray.serve.sampling import SamplingParams, make_generator, sample_token, token_probs
from rrt_ray.serve.speculative import DRAFT_SCHEDULES, accept_greedy, accept_sampled, next_draft_length

KV_FILL_MODES: tuple[str, ...] = ("propagate", "share")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when one is visible, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine device 'cuda' was asked for, but no CUDA device is visible; allowed here: auto, cpu")
    return torch.device(device)


@dataclass
class EngineConfig:
    """Scheduler limits.

    max_num_seqs: requests holding a KV row at once (running); the rest wait in the queue.
    max_batch_tokens: soft budget of tokens in flight per step; prompt chunks fill what decode tokens
        leave (decode tokens always run, so a step can exceed it by at most max_num_seqs).
    max_model_len: prompt + max_tokens of one request; None: the model's max_position_embeddings.
    kv_fill: how an early-exited token's missing deeper keys/values are filled: "propagate" or "share".
    weights: "lora" (W'x + B_b A_b x) or "merged" (a dense W' + B_b A_b per depth: the original model's
        arithmetic for B x the relaxed projections' memory); see rrt_ray.serve.runner.
    device: "auto" (CUDA when visible), "cpu" or "cuda": the model and every tensor the engine makes.
    exit_rule: what a request's exit_threshold is compared with: "confidence" (the exit head's max softmax
        probability: the head runs for every scored token) or "classifier" (a learned probe on the hidden
        state; the head runs only where a token leaves). See rrt_ray.serve.exit_rules.
    dtype: "auto" (the model's own), "float32", "bfloat16" or "float16" (the latter two for GPUs; these
        CPUs have no fast bf16 path). Exit decisions and sampling always read fp32 logits.
    """

    max_num_seqs: int = 16
    max_batch_tokens: int = 256
    max_model_len: int | None = None
    kv_fill: str = "propagate"
    weights: str = "lora"
    device: str = "auto"
    dtype: str = "auto"
    exit_rule: str = "confidence"
    draft_schedule: str = "heuristic"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_fill not in KV_FILL_MODES:
            raise ValueError(f"unknown kv_fill {self.kv_fill!r}; allowed: {', '.join(KV_FILL_MODES)}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"unknown weights {self.weights!r}; allowed: {', '.join(WEIGHT_MODES)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; allowed: {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.exit_rule not in EXIT_RULES:
            raise ValueError(f"unknown exit_rule {self.exit_rule!r}; allowed: {', '.join(EXIT_RULES)}")
        if self.draft_schedule not in DRAFT_SCHEDULES:
            raise ValueError(f"unknown draft_schedule {self.draft_schedule!r}; allowed: {', '.join(DRAFT_SCHEDULES)}")


@dataclass
class RequestOutput:
    """What one step produced for one request: the new part and everything so far."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    exit_loops: list[int]  # loops run by each generated token (1 .. B)
    logprobs: list[float]  # log p(token) under the exit head's distribution (temperature 1)
    argmax_ids: list[int]  # the exit head's most probable token at each step (= token_ids when greedy)
    text: str
    num_prompt_tokens: int
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"
    top_logprobs: list[dict[int, float]] | None = None  # per generated token, when params.logprobs is set
    prompt_logprobs: list[float | None] | None = None  # full depth, None for the first prompt token
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    drafted: int = 0  # speculative mode: tokens drafted by the loop-1 exit
    accepted: int = 0  # ... and kept by the full-depth verification


@dataclass
class RequestState:
    """A request inside the engine (what exit policies see)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop_limit: int  # loops its tokens may run: min(B, params.max_loops)
    teacher_ids: list[int] | None = None  # scoring: feed these instead of sampling
    seq: int = -1  # KV pool row while running
    prefilled: int = 0  # prompt tokens already put in flight
    output_ids: list[int] = field(default_factory=list)
    exit_loops: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    argmax_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted_text: int = 0
    emitted_tokens: int = 0
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    prompt_rows_left: int = 0  # prompt rows still to run their last loop
    # speculative mode: the round being drafted
    drafts: list[int] = field(default_factory=list)
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # (V,) each, sampled requests only
    parked: list["_Unit"] = field(default_factory=list)  # draft inputs after loop 1, waiting to verify
    draft_len: int = 0  # drafts of the next round (EngineConfig.draft_schedule); set on admission
    drafted: int = 0
    accepted: int = 0

    @property
    def speculative(self) -> bool:
        return self.params.exit_mode == "speculative" and self.loop_limit > 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class _Unit:
    """Tokens of one request at one loop depth, in flight: a prompt chunk or one decode token."""

    request: RequestState
    start: int  # token position of the first row
    token_ids: torch.Tensor  # (n,)
    hidden: torch.Tensor | None = None  # (n, d) after `loops_done` loops; None before loop 1
    loops_done: int = 0
    emits: bool = False  # its last row predicts the request's next token (every row, for "verify")
    kind: str = "decode"  # "prompt", "decode", "draft" (speculative, loop 1 only) or "verify" (all rows)

    def __len__(self) -> int:
        return self.token_ids.shape[0]


class ExitPolicy:
    """The early-exit rule: after each loop, does a token (the request's next prediction) exit?

    Subclass to force exits (tests, oracle studies); the engine itself exits a token at loop_limit.
    """

    def needs_confidence(self, request: RequestState, loops_done: int) -> bool:
        return request.params.exit_mode == "confidence" and request.params.exit_threshold < 1.0

    def should_exit(self, request: RequestState, loops_done: int, confidence: float) -> bool:
        threshold = request.params.exit_threshold
        return threshold < 1.0 and confidence >= threshold


class Engine:
    """Continuous batching with early exit and depth-wise batching; see the module docstring.

        engine = Engine(model, tokenizer)
        engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=32, exit_threshold=0.8))
        while engine.has_unfinished():
            for out in engine.step(): ...
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        config: EngineConfig | None = None,
        exit_policy: ExitPolicy | None = None,
        exit_classifier: ExitClassifier | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        model = model.eval().to(device=resolve_device(self.config.device), dtype=DTYPES[self.config.dtype])
        self.runner = ModelRunner(model, weights=self.config.weights)
        self.device = self.runner.device
        self.exit_policy = exit_policy or ExitPolicy()
        if self.config.exit_rule == "classifier" and exit_classifier is None:
            raise ValueError("exit_rule 'classifier' needs a fitted ExitClassifier (rrt_ray.serve.exit_rules.fit_exit_classifier)")
        self.exit_classifier = None if exit_classifier is None else exit_classifier.to(self.device)
        max_positions = getattr(self.runner.text_config, "max_position_embeddings", None)
        self.max_model_len = self.config.max_model_len or max_positions or 2048
        self.pool = KVPool(self.runner.num_slots, self.config.max_num_seqs, self.max_model_len)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.waiting: deque[RequestState] = deque()
        self.running: dict[str, RequestState] = {}
        self._inflight: list[_Unit] = []
        self._ids = itertools.count()
        self._finished_outputs: list[RequestOutput] = []
        # Counters the server exports (read-only outside).
        self.stats = dict.fromkeys((
            "steps", "generated_tokens", "prompt_tokens", "rows", "filled_rows", "mixed_depth_steps",
            "head_rows", "drafted_tokens", "accepted_drafts",
        ), 0)
        self.exit_loop_counts = [0] * (self.num_loops + 1)  # index = loops run

    @property
    def num_loops(self) -> int:
        """Exit points per token: B for a cycle recursive model, 1 otherwise."""
        return self.runner.num_loops

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        teacher_ids: Sequence[int] | None = None,
    ) -> str:
        """Queue a request; returns its id. teacher_ids: score these tokens (teacher forcing) instead of sampling."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.running or any(r.request_id == request_id for r in self.waiting):
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if teacher_ids is not None:
            teacher_ids = self._check_ids(teacher_ids, "teacher ids")
            # speculative teacher forcing would score full depth anyway: score it as "none"
            mode = "none" if params.exit_mode == "speculative" else params.exit_mode
            fields = {**params.__dict__, "max_tokens": len(teacher_ids), "stop": (), "stop_token_ids": (), "ignore_eos": True, "exit_mode": mode}
            params = SamplingParams(**fields)
        prompt = self.check_request(prompt_ids, params)
        loop_limit = min(self.num_loops, params.max_loops or self.num_loops)
        request = RequestState(
            request_id, prompt, params, loop_limit, teacher_ids=teacher_ids,
            generator=None if params.greedy else make_generator(params.seed), prompt_rows_left=len(prompt),
            draft_len=params.draft_tokens,
        )
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(prompt)
            request.prompt_top_logprobs = [None] * len(prompt)
        self.waiting.append(request)
        return request_id

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """Raise ValueError naming what is wrong with a request; reads only fixed settings (any thread)."""
        prompt = self._check_ids(prompt_ids, "the prompt")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the engine's "
                f"max_model_len {self.max_model_len}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; pass one to the Engine or use stop_token_ids")
        if params.max_loops is not None and params.max_loops > self.num_loops:
            raise ValueError(f"max_loops must be in 1..{self.num_loops} for this model, got {params.max_loops}")
        return prompt

    def _check_ids(self, ids: Sequence[int], what: str) -> list[int]:
        vocab = self.runner.embed.num_embeddings
        if not ids:
            raise ValueError(f"{what} is empty: at least one token is needed")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"{what} must hold token ids in [0, {vocab})")
        return [int(t) for t in ids]

    def abort(self, request_id: str) -> None:
        for request in list(self.waiting):
            if request.request_id == request_id:
                self.waiting.remove(request)
                request.finish_reason = "abort"
                self._finished_outputs.append(self._output(request))
        if request_id in self.running:
            self._finish(self.running[request_id], "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._finished_outputs)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_inflight_tokens(self) -> int:
        return sum(len(u) for u in self._inflight)

    # ------------------------------------------------------------------ the step

    def _schedule(self) -> None:
        """Continue prompts of running requests, then admit waiting ones, within the token budget."""
        budget = self.config.max_batch_tokens - sum(len(u) for u in self._inflight)
        for request in self.running.values():
            budget -= self._add_prompt_chunk(request, budget)
        while self.waiting and self.pool.num_free and budget > 0:
            request = self.waiting.popleft()
            request.seq = self.pool.allocate()
            self.running[request.request_id] = request
            budget -= self._add_prompt_chunk(request, budget)

    def _add_prompt_chunk(self, request: RequestState, budget: int) -> int:
        remaining = len(request.prompt_ids) - request.prefilled
        n = min(remaining, budget)
        if n <= 0:
            return 0
        start = request.prefilled
        ids = torch.tensor(request.prompt_ids[start : start + n], device=self.device)
        last = start + n == len(request.prompt_ids)
        self._inflight.append(_Unit(request, start, ids, emits=last and request.params.max_tokens > 0, kind="prompt"))
        request.prefilled += n
        self.stats["prompt_tokens"] += n
        return n

    def _make_batch(self, units: list[_Unit], loops: list[int]) -> StepBatch:
        # python lists, one tensor each: a few small host-to-device copies instead of 3 per unit
        seqs, pos, loop_rows, spans, row = [], [], [], [], 0
        for unit, loop in zip(units, loops):
            n = len(unit)
            seqs += [unit.request.seq] * n
            pos += range(unit.start, unit.start + n)
            loop_rows += [loop] * n
            spans.append(Span((row, row + n), unit.request.seq, unit.start, loop))
            row += n
        as_tensor = partial(torch.tensor, device=self.device)
        return StepBatch(
            self.pool, as_tensor(seqs), as_tensor(pos), as_tensor(loop_rows),
            self.runner.slot_table, spans, distinct_loops=sorted(set(loops)),
        )

    @torch.inference_mode()  # no autograd bookkeeping per op (TensorMemo handles inference tensors)
    def step(self) -> list[RequestOutput]:
        """Run one loop of the block over every token in flight; exit, draft, verify, sample, refill."""
        outputs, self._finished_outputs = self._finished_outputs, []
        self._schedule()
        if not self._inflight:
            return outputs
        # Rows grouped by loop depth: each depth's LoRA and norms then run on a slice of the batch
        # (kernels/segments.depth_runs). Stable, so requests keep their arrival order within a depth.
        units = self._inflight
        units.sort(key=lambda u: u.loops_done)
        new = [u for u in units if u.hidden is None]
        if new:  # embed all tokens entering loop 1 in one call
            embedded = self.runner.embed(torch.cat([u.token_ids for u in new]))
            offset = 0
            for u in new:
                u.hidden, offset = embedded[offset : offset + len(u)], offset + len(u)
        batch = self._make_batch(units, [u.loops_done for u in units])
        hidden = self.runner.run_loop(torch.cat([u.hidden for u in units]), batch)  # (T, d)
        self.stats["steps"] += 1
        self.stats["rows"] += hidden.shape[0]
        self.stats["mixed_depth_steps"] += int(len(batch.distinct_loops) > 1)
        offset = 0
        for u in units:
            u.hidden, offset = hidden[offset : offset + len(u)], offset + len(u)
            u.loops_done += 1

        fresh: list[_Unit] = []  # units that enter loop 1 next step
        touched: dict[str, RequestState] = {}
        self._score_prompts([u for u in units if u.kind == "prompt" and u.loops_done == u.request.loop_limit], touched)
        exited = self._decide_exits([u for u in units if u.emits and u.kind in ("prompt", "decode")])
        for unit, logits, logprobs in exited:
            self._accept_token(unit.request, logits, logprobs, unit.loops_done)
        self._fill_skipped([u for u, _, _ in exited if u.request.finish_reason is None])
        for unit, _, _ in exited:
            touched[unit.request.request_id] = unit.request
            unit.emits = False
            if len(unit) > 1:  # the rest of a prompt chunk still needs its deeper loops
                unit.token_ids, unit.hidden = unit.token_ids[:-1], unit.hidden[:-1]
            else:
                unit.loops_done = unit.request.loop_limit  # done: dropped below
            if unit.request.finish_reason is None:
                fresh.append(self._next_unit(unit.request))
        fresh += self._draft([u for u in units if u.emits and u.kind == "draft"])
        verified = [u for u in units if u.emits and u.kind == "verify" and u.loops_done >= u.request.loop_limit]
        fresh += self._verify(verified, touched)
        self._inflight = [u for u in units if u.loops_done < u.request.loop_limit and u.request.finish_reason is None]
        self._inflight += [u for u in fresh if u.request.finish_reason is None]
        outputs += [self._output(request) for request in touched.values()]
        return outputs

    def _next_unit(self, request: RequestState) -> _Unit:
        """The request's last token, entering loop 1: a decode row, or the first draft of a round."""
        last = torch.tensor([request.output_ids[-1]], device=self.device)
        return _Unit(request, request.num_tokens - 1, last, emits=True, kind="draft" if request.speculative else "decode")

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Exit-head logits (U, V) fp32 for hidden (U, d); counts the rows (the head is the costly part)."""
        self.stats["head_rows"] += hidden.shape[0]
        return self.runner.exit_logits(hidden)

    def _score_prompts(self, units: list[_Unit], touched: dict[str, RequestState]) -> None:
        """Prompt rows that ran their last loop: full-depth log-probs of the next prompt token (echo)."""
        rows = []
        for u in units:
            request = u.request
            request.prompt_rows_left -= len(u)
            if request.prompt_logprobs is not None:
                n = min(len(u), len(request.prompt_ids) - 1 - u.start)  # rows whose next token is a prompt token
                rows += [(u, i) for i in range(n)]
            if request.prompt_rows_left == 0 and request.params.max_tokens == 0:
                touched[request.request_id] = request
        if rows:
            logprobs = torch.log_softmax(self._head(torch.stack([u.hidden[i] for u, i in rows])), dim=-1)  # (R, V)
            targets = torch.tensor([u.request.prompt_ids[u.start + i + 1] for u, i in rows], device=self.device)
            chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
            for (u, i), lp, row in zip(rows, chosen, logprobs):
                u.request.prompt_logprobs[u.start + i + 1] = lp
                u.request.prompt_top_logprobs[u.start + i + 1] = _top(row, u.request.params.prompt_logprobs)
        for request in touched.values():
            if request.finish_reason is None and request.params.max_tokens == 0 and request.prompt_rows_left == 0:
                self._finish(request, "length")

    def _decide_exits(self, candidates: list[_Unit]) -> list[tuple[_Unit, torch.Tensor, torch.Tensor]]:
        """Which emitting units exit after this loop, with their exit-head logits and log-probs (V,).

        A unit at its loop limit always exits. Otherwise the exit rule scores it: the confidence rule from
        the head's logits (so the head runs for every scored unit), the classifier from the hidden state
        (so the head runs only for the units that leave)."""
        leaving = [u for u in candidates if u.loops_done >= u.request.loop_limit]
        scored = [
            u for u in candidates
            if u.loops_done < u.request.loop_limit and self.exit_policy.needs_confidence(u.request, u.loops_done)
            # a scored prompt (echo) must run every row to full depth before its first token can finish the
            # request (max_tokens 1): its last chunk never exits early, and earlier chunks are ahead of it
            and not (u.kind == "prompt" and u.request.prompt_logprobs is not None)
        ]
        known: dict[int, torch.Tensor] = {}  # id(unit) -> logits already computed by the confidence rule
        if scored:
            hidden = torch.stack([u.hidden[-1] for u in scored])  # (U, d)
            if self.config.exit_rule == "classifier":
                loops = torch.tensor([u.loops_done - 1 for u in scored], device=self.device)
                scores = self.exit_classifier(self.runner.final_norm(hidden).float(), loops).tolist()
            else:
                logits = self._head(hidden)  # (U, V)
                scores = torch.softmax(logits, dim=-1).amax(dim=-1).tolist()  # max softmax probability
                known = {id(u): logits[i] for i, u in enumerate(scored)}
            leaving += [u for u, s in zip(scored, scores) if self.exit_policy.should_exit(u.request, u.loops_done, s)]
        if not leaving:
            return []
        missing = [u for u in leaving if id(u) not in known]
        if missing:
            logits = self._head(torch.stack([u.hidden[-1] for u in missing]))
            known.update({id(u): logits[i] for i, u in enumerate(missing)})
        rows = torch.stack([known[id(u)] for u in leaving])  # (E, V)
        logprobs = torch.log_softmax(rows, dim=-1)
        return [(u, rows[i], logprobs[i]) for i, u in enumerate(leaving)]

    def _draft(self, units: list[_Unit]) -> list[_Unit]:
        """Speculative draft rows after loop 1: draft the next token from the loop-1 exit and park the row.
        Returns the next units: the next draft, or the round's verify unit once its drafts are in."""
        if not units:
            return []
        logits = self._head(torch.stack([u.hidden[-1] for u in units]))  # (U, V)
        fresh = []
        for u, row in zip(units, logits):
            request, params = u.request, u.request.params
            if params.greedy:
                token = int(torch.argmax(row))
            else:
                q = token_probs(row, params)  # (V,) the draft distribution, kept for the acceptance rule
                token = int(torch.multinomial(q, 1, generator=request.generator))
                request.draft_probs.append(q)
            request.drafts.append(token)
            request.parked.append(u)
            u.emits, u.loops_done = False, request.loop_limit  # leaves the batch; its loop-1 state is parked
            budget = min(request.draft_len, params.max_tokens - len(request.output_ids))
            ends = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
            if len(request.drafts) < budget and not ends:
                fresh.append(_Unit(request, u.start + 1, torch.tensor([token], device=self.device), emits=True, kind="draft"))
                continue
            parked, request.parked = request.parked, []
            fresh.append(_Unit(
                request, parked[0].start, torch.cat([p.token_ids for p in parked]),
                hidden=torch.cat([p.hidden for p in parked]), loops_done=1, emits=True, kind="verify",
            ))
        # verify units continue at loop 2 next step: they are not new, but they join the batch like new ones
        return fresh

    def _verify(self, units: list[_Unit], touched: dict[str, RequestState]) -> list[_Unit]:
        """Verify rows at full depth: keep the drafts the full-depth model agrees with, emit, start the next round."""
        if not units:
            return []
        logits = self._head(torch.cat([u.hidden for u in units]))  # (sum k, V)
        fresh, offset = [], 0
        for u in units:
            request, k = u.request, len(u)
            rows, offset = logits[offset : offset + k], offset + k
            if request.params.greedy:
                kept, tokens = accept_greedy(request.drafts, rows)
            else:
                kept, tokens = accept_sampled(request.drafts, request.draft_probs, rows, request.params, request.generator)
            request.drafted += len(request.drafts)
            request.accepted += kept
            request.draft_len = next_draft_length(self.config.draft_schedule, request.draft_len, len(request.drafts), kept,
                                                  request.params.draft_tokens)
            self.stats["drafted_tokens"] += len(request.drafts)
            self.stats["accepted_drafts"] += kept
            request.drafts, request.draft_probs = [], []
            logprobs = torch.log_softmax(rows, dim=-1)
            for i, token in enumerate(tokens):
                self._accept_token(request, rows[i], logprobs[i], u.loops_done, token=token)
                if request.finish_reason is not None:
                    break
            u.emits, u.loops_done = False, request.loop_limit
            touched[request.request_id] = request
            if request.finish_reason is None:
                fresh.append(self._next_unit(request))
        return fresh

    def _fill_skipped(self, exited: list[_Unit]) -> None:
        """Keys/values of the loops an exited token skipped (up to its request's loop limit)."""
        rows = [(u, loop) for u in exited for loop in range(u.loops_done, u.request.loop_limit)]
        if not rows:
            return
        self.stats["filled_rows"] += len(rows)
        as_tensor = partial(torch.tensor, device=self.device)
        seqs = as_tensor([u.request.seq for u, _ in rows])
        pos = as_tensor([u.start + len(u) - 1 for u, _ in rows])
        loops = as_tensor([loop for _, loop in rows])
        if self.config.kv_fill == "share":
            exit_loops = as_tensor([u.loops_done - 1 for u, _ in rows])
            for c in range(self.runner.num_columns):
                table = self.runner.slot_table[:, c]
                self.pool.copy(table[exit_loops], table[loops], seqs, pos)
            return
        batch = StepBatch(self.pool, seqs, pos, loops, self.runner.slot_table, fill_only=True, distinct_loops=sorted({l for _, l in rows}))
        self.runner.fill_propagate(torch.stack([u.hidden[-1] for u, _ in rows]), batch)

    def _accept_token(
        self, request: RequestState, logits: torch.Tensor, logprobs: torch.Tensor, loops_run: int, token: int | None = None,
    ) -> None:
        """Emit one token (sampled here unless given: teacher forcing, speculative verification) from the
        exit's logits and log-probs (V,)."""
        if token is not None:
            pass
        elif request.teacher_ids is not None:
            token = request.teacher_ids[len(request.output_ids)]
        else:
            token = sample_token(logits, request.params, request.generator)
        request.output_ids.append(token)
        request.exit_loops.append(loops_run)
        request.logprobs.append(float(logprobs[token]))
        if request.params.logprobs is not None:
            request.top_logprobs.append(_top(logprobs, request.params.logprobs))
        greedy_sampled = request.params.greedy and request.teacher_ids is None
        request.argmax_ids.append(token if greedy_sampled else int(torch.argmax(logits)))
        self.stats["generated_tokens"] += 1
        self.exit_loop_counts[loops_run] += 1
        params = request.params
        if not params.ignore_eos and token in self.eos_token_ids or token in params.stop_token_ids:
            self._update_text(request)
            self._finish(request, "stop")
        elif self._update_text(request):
            self._finish(request, "stop")
        elif len(request.output_ids) >= params.max_tokens:
            self._finish(request, "length")

    def _update_text(self, request: RequestState) -> bool:
        """Detokenize; cut at the first stop string. Returns True when a stop string was found."""
        if self.tokenizer is None:
            return False
        text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        stops = request.params.stop
        if stops:
            # only the tail can hold a new match: text before it was searched last time
            search_from = max(0, len(request.text) - max(len(s) for s in stops))
            hits = [i for s in stops if (i := text.find(s, search_from)) >= 0]
            if hits:
                request.text = text[: min(hits)]
                return True
        request.text = text
        return False

    def _finish(self, request: RequestState, reason: str) -> None:
        request.finish_reason = reason
        self.running.pop(request.request_id, None)
        self._inflight = [u for u in self._inflight if u.request is not request]
        if request.seq >= 0:
            self.pool.release(request.seq)
            request.seq = -1
        if reason == "abort":
            self._finished_outputs.append(self._output(request))

    def _output(self, request: RequestState) -> RequestOutput:
        """The update for one request since its last output; text held back while it may still change."""
        finished = request.finish_reason is not None
        text = request.text
        safe = len(text)
        if not finished:
            if request.params.stop:  # a stop string may still complete over the held-back tail
                safe -= max(len(s) for s in request.params.stop) - 1
            while safe > 0 and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                safe -= 1
        safe = max(safe, request.emitted_text)
        new_text = text[request.emitted_text : safe]
        request.emitted_text = safe
        new_tokens = request.output_ids[request.emitted_tokens :]
        request.emitted_tokens = len(request.output_ids)
        return RequestOutput(
            request.request_id, new_tokens, new_text, list(request.output_ids), list(request.exit_loops),
            list(request.logprobs), list(request.argmax_ids), text, len(request.prompt_ids), finished, request.finish_reason,
            top_logprobs=list(request.top_logprobs) if request.params.logprobs is not None else None,
            prompt_logprobs=request.prompt_logprobs, prompt_top_logprobs=request.prompt_top_logprobs,
            drafted=request.drafted, accepted=request.accepted,
        )

    # ------------------------------------------------------------------ convenience

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_step: Callable[[list[RequestOutput]], None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion (all queued at once); returns the final output of each, in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            outs = self.step()
            if on_step is not None:
                on_step(outs)
            for out in outs:
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]


def _top(logprobs: torch.Tensor, k: int) -> dict[int, float]:
    """The k most probable tokens of log-probs (V,) as {token: logprob}, most probable first."""
    if k == 0:
        return {}
    values, ids = torch.topk(logprobs, k)
    return dict(zip(ids.tolist(), values.tolist()))
