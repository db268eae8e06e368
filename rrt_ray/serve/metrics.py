"""Prometheus metrics of the serving app (exposed at GET /metrics).

Engine metrics (one registry per model replica, `EngineMetrics`):
    rrt_exit_loops                 histogram  loops each generated token ran before it exited (1..B)
    rrt_generated_tokens_total     counter    tokens generated (rate() of it is tokens/s)
    rrt_tokens_per_second          gauge      generated tokens/s over the last `window_s` seconds
    rrt_prompt_tokens_total        counter    prompt tokens prefilled
    rrt_queue_length               gauge      requests waiting for a KV row
    rrt_running_requests           gauge      requests holding a KV row
    rrt_step_seconds               histogram  duration of one engine step (one loop over the batch)
    rrt_batch_rows                 histogram  tokens in flight per step
HTTP metrics (one registry per ingress replica, `RequestMetrics`):
    rrt_requests_total{status}     counter    finished HTTP requests by outcome: ok, bad_request, unauthorized,
                                              not_found, overloaded, unavailable (engine lost), cancelled (the
                                              client went away), error (a server bug)
    rrt_request_seconds            histogram  end-to-end latency of successful requests

Each replica has its own registry, so two engines in one process never clash. GET /metrics answers the
ingress's HTTP metrics followed by ONE model replica's engine metrics (with several model replicas,
scrape each, or use Ray's metrics export).
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the HTTP layer)


def exit_loop_buckets(num_loops: int) -> list[float]:
    """One bucket per exit depth 1..B (upper bounds 1.5, 2.5, ...), then +Inf.

    Prometheus needs at least two buckets: a plain (1-loop) model gets [1.5, +Inf].
    """
    return [depth + 0.5 for depth in range(1, num_loops + 1)] + [float("inf")]


class EngineMetrics:
    """What the engine thread of one model replica observes."""

    def __init__(self, num_loops: int, window_s: float = 10.0) -> None:
        self.registry = r = CollectorRegistry()
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.exit_loops = Histogram(
            "rrt_exit_loops", "Loops run by each generated token before it exited", buckets=exit_loop_buckets(num_loops), registry=r,
        )
        self.generated_tokens = Counter("rrt_generated_tokens", "Generated tokens", registry=r)
        self.tokens_per_second = Gauge("rrt_tokens_per_second", "Generated tokens per second, recent window", registry=r)
        self.prompt_tokens = Counter("rrt_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.queue_length = Gauge("rrt_queue_length", "Requests waiting for a KV row", registry=r)
        self.running = Gauge("rrt_running_requests", "Requests holding a KV row", registry=r)
        self.step_seconds = Histogram(
            "rrt_step_seconds", "Duration of one engine step", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.batch_rows = Histogram(
            "rrt_batch_rows", "Tokens in flight per engine step", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self._prompt_seen = 0

    def observe_step(self, engine, outputs, seconds: float) -> None:
        """Called by the engine thread after every step."""
        new_tokens = 0
        for out in outputs:
            for loops in out.exit_loops[len(out.exit_loops) - len(out.new_token_ids) :]:
                self.exit_loops.observe(loops)
            new_tokens += len(out.new_token_ids)
        self.generated_tokens.inc(new_tokens)
        prompt = engine.stats["prompt_tokens"]
        self.prompt_tokens.inc(prompt - self._prompt_seen)
        self._prompt_seen = prompt
        self.step_seconds.observe(seconds)
        self.batch_rows.observe(engine.num_inflight_tokens)
        now = time.monotonic()
        self._recent.append((now, new_tokens))
        self._update_gauges(engine, now)

    def observe_idle(self, engine) -> None:
        self._update_gauges(engine, time.monotonic())

    def _update_gauges(self, engine, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        self.tokens_per_second.set(sum(n for _, n in self._recent) / self.window_s)
        self.queue_length.set(engine.num_waiting)
        self.running.set(engine.num_running)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """What the HTTP layer observes: one count per finished request, by outcome."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("rrt_requests", "Finished HTTP requests by outcome", ["status"], registry=r)
        self.request_seconds = Histogram(
            "rrt_request_seconds", "End-to-end latency of successful requests", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
        )

    def count(self, status: str, started: float | None = None) -> None:
        """One finished request; `started` (perf_counter) also records the latency of a successful one."""
        self.requests.labels(status=status).inc()
        if started is not None:
            self.request_seconds.observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
