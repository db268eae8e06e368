"""Step profile of the serving engine: where one engine step's wall time goes.

    profiler = StepProfiler(engine)      # installs timing hooks on this engine's model and methods
    ... engine.step() ...
    profiler.report()                    # {"matmul": s, "lora": s, ..., "steps": n, "rows": n}
    profiler.close()                     # removes every hook

Categories (exclusive time: a category nested in another is charged to the inner one):

    matmul      the dense projections: F.linear of W' (or a per-depth merged W' + B_b A_b) and bias
    lora        the per-depth LoRA correction (rrt_ray.kernels.multi_lora)
    norms       per-depth norms (PerDepth) / the plain model's norms
    attention   the engine's attention over the cache: KV writes and SDPA per span
    exit        the exit decision and the exit head (final norm + LM head, or a cheaper rule)
    kv_fill     keys/values filled for the loops an exited token skipped (whole, projections included)
    layer_other the rest of a decoder layer and of the loop: rotary, activations, residuals, HF Python
    scheduling  the engine's own Python: scheduling, batch building, sampling, bookkeeping

Time is taken with perf_counter at every category boundary (after a device synchronize on CUDA), so the
hooks themselves add a few microseconds per call: the profile is a separate run from the timed one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn
from transformers import AttentionInterface

CATEGORIES: tuple[str, ...] = ("matmul", "lora", "norms", "attention", "exit", "kv_fill", "layer_other", "scheduling")
# Categories timed as a whole: what runs inside them (a fill's k/v projections) is not split out.
_OPAQUE = frozenset({"exit", "kv_fill"})


class StepProfiler:
    """Exclusive wall time per category over the engine steps run while installed."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.steps = self.rows = 0
        self._stack: list[str] = []
        self._last = 0.0
        self._sync = engine.runner.device.type == "cuda"
        self._undo: list[Callable[[], None]] = []
        self._install()

    # ------------------------------------------------------------------ the clock

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def push(self, category: str) -> bool:
        """Enter a category; returns False (and does nothing) inside an opaque one or outside a step."""
        if not self._stack or self._stack[-1] in _OPAQUE:
            return False
        now = self._now()
        self.seconds[self._stack[-1]] += now - self._last
        self._stack.append(category)
        self._last = now
        return True

    def pop(self) -> None:
        now = self._now()
        self.seconds[self._stack.pop()] += now - self._last
        self._last = now

    def _timed(self, category: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            entered = self.push(category)
            try:
                return fn(*args, **kwargs)
            finally:
                if entered:
                    self.pop()

        return wrapper

    # ------------------------------------------------------------------ hooks

    def _patch(self, owner: object, name: str, category: str) -> None:
        original = getattr(owner, name)
        had_own = name in getattr(owner, "__dict__", {})
        setattr(owner, name, self._timed(category, original))
        self._undo.append(lambda: setattr(owner, name, original) if had_own else delattr(owner, name))

    def _hook_module(self, module: nn.Module, category: str) -> None:
        entered: list[bool] = []

        def pre(_module, _args):
            entered.append(self.push(category))

        def post(_module, _args, _out):
            if entered.pop():
                self.pop()

        handles = (module.register_forward_pre_hook(pre), module.register_forward_hook(post))
        self._undo.append(lambda: [h.remove() for h in handles])

    def _install(self) -> None:
        import rrt_ray.models.lora as lora_module
        from rrt_ray.models.lora import RelaxedLoRALinear
        from rrt_ray.models.per_depth import PerDepth
        from rrt_ray.serve import kv_cache

        engine, runner = self.engine, self.engine.runner
        for column in runner.columns:
            for module in column.layer.modules():
                if isinstance(module, (nn.Linear, RelaxedLoRALinear)):
                    self._hook_module(module, "matmul")
                elif isinstance(module, PerDepth) or (
                    not list(module.children()) and "norm" in type(module).__name__.lower() and not _inside_per_depth(module, column.layer)
                ):
                    self._hook_module(module, "norms")
            self._hook_module(column.layer, "layer_other")
        self._patch(lora_module, "multi_lora", "lora")
        attention = kv_cache.engine_attention
        AttentionInterface.register(kv_cache.ATTN_IMPLEMENTATION, self._timed("attention", attention))
        self._undo.append(lambda: AttentionInterface.register(kv_cache.ATTN_IMPLEMENTATION, attention))
        self._patch(engine, "_decide_exits", "exit")
        self._patch(engine, "_head", "exit")  # drafts, verification and prompt scoring run the head too
        self._patch(engine, "_fill_skipped", "kv_fill")
        self._patch(runner, "run_loop", "layer_other")
        self._hook_module(runner.embed, "layer_other")
        step = engine.step

        def profiled_step():
            self._stack, self._last = ["scheduling"], self._now()  # the step's root: the engine's Python
            rows_before = engine.stats["rows"]
            try:
                return step()
            finally:
                self.pop()
                self.steps += 1
                self.rows += engine.stats["rows"] - rows_before

        engine.step = profiled_step
        self._undo.append(lambda: delattr(engine, "step"))

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()

    # ------------------------------------------------------------------ the result

    def report(self) -> dict:
        total = sum(self.seconds.values())
        return {"seconds": dict(self.seconds), "total_s": total, "steps": self.steps, "rows": self.rows}


def _inside_per_depth(module: nn.Module, layer: nn.Module) -> bool:
    from rrt_ray.models.per_depth import PerDepth

    return any(isinstance(m, PerDepth) and m.inner is module for m in layer.modules())


def format_profile(name: str, report: dict, tokens: int) -> list[str]:
    """Markdown rows: ms per step per category and the share of the profiled wall time."""
    steps = max(report["steps"], 1)
    total = report["total_s"] or 1.0
    cells = [f"{1e3 * report['seconds'][c] / steps:.2f} ({100 * report['seconds'][c] / total:.0f}%)" for c in CATEGORIES]
    return [f"| {name} | {report['steps']} | {report['rows'] / steps:.1f} | {1e3 * total / steps:.2f} | " + " | ".join(cells) + " |"]
