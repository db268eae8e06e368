"""The engine's step loop on a background thread, with asyncio streams for the HTTP layer (no Ray).

    runner = AsyncEngine(engine, max_concurrent=64, metrics=EngineMetrics(...))
    stream = runner.submit(prompt_ids, params)   # raises Overloaded / EngineDead at once
    await stream.accepted()                      # raises RequestRejected when the engine refuses it
    async for out in stream:                     # RequestOutput updates until finished
        ...

One thread owns the Engine (it is not thread-safe): it takes typed submissions and aborts from a queue,
runs `engine.step()` while there is work, and hands each update to the asyncio loop of the request's
caller with `call_soon_threadsafe`. The engine validates a request once, in `add_request` on its own
thread; the verdict comes back as the stream's first item (`accepted()`), so a caller can still answer
4xx before it starts a response. A caller that goes away (client disconnect, cancellation) aborts its
request, so its KV row is freed at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rrt_ray.serve.engine import Engine, RequestOutput
from rrt_ray.serve.metrics import EngineMetrics
from rrt_ray.serve.sampling import SamplingParams


class Overloaded(Exception):
    """More requests in flight than the server accepts (the HTTP layer answers 503)."""


class EngineDead(Exception):
    """The step loop stopped on an internal error; requests fail with it."""


class RequestRejected(ValueError):
    """The engine refused the request (a token id out of range, prompt + max_tokens too long, ...)."""


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams


@dataclass(frozen=True)
class _Abort:
    request_id: str


_ACCEPTED = object()  # the stream's first item when add_request took the request


class AsyncEngine:
    def __init__(self, engine: Engine, max_concurrent: int, metrics: EngineMetrics | None = None) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.engine = engine
        self.max_concurrent = max_concurrent
        self.metrics = metrics
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams (both threads touch it)
        self._ids = itertools.count()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rrt-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._streams)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> "RequestStream":
        """Queue a request now; `await stream.accepted()` for the engine's verdict, then iterate it.

        Raises Overloaded (at the concurrency limit) or EngineDead before anything is queued.
        """
        if not self.alive:
            raise EngineDead(f"the engine loop stopped: {self.error!r}")
        request_id = f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._streams) >= self.max_concurrent:
                raise Overloaded(f"the server is at its limit of {self.max_concurrent} concurrent requests; retry later")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._inbox.put(_Add(request_id, prompt_ids, params))
        self._wake.set()
        return RequestStream(self, request_id, stream)

    def _release(self, request_id: str, finished: bool) -> None:
        if not finished:  # the caller went away or failed: free the request's KV row at the next step
            self._inbox.put(_Abort(request_id))
            self._wake.set()
        with self._lock:
            self._streams.pop(request_id, None)

    # ------------------------------------------------------------------ the engine thread

    def _deliver(self, request_id: str, item: object) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _take_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Abort):
                self.engine.abort(item.request_id)
                continue
            with self._lock:
                wanted = item.request_id in self._streams
            if not wanted:  # closed before the engine saw it
                continue
            try:
                self.engine.add_request(item.prompt_ids, item.params, request_id=item.request_id)
            except ValueError as err:  # the request's fault: refuse it, never take the loop down
                self._deliver(item.request_id, RequestRejected(str(err)))
            else:
                self._deliver(item.request_id, _ACCEPTED)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._take_inbox()
                if not self.engine.has_unfinished():
                    if self.metrics is not None:
                        self.metrics.observe_idle(self.engine)
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                started = time.perf_counter()
                outputs = self.engine.step()
                if self.metrics is not None:
                    self.metrics.observe_step(self.engine, outputs, time.perf_counter() - started)
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as err:  # noqa: BLE001  (an engine bug: fail every waiting request, not hang)
            self.error = err
            with self._lock:
                ids = list(self._streams)
            for request_id in ids:
                self._deliver(request_id, EngineDead(f"the engine loop stopped: {err!r}"))
            raise


class RequestStream:
    """Async iterator over one request's RequestOutput updates; `close()` (or leaving early) aborts it."""

    def __init__(self, owner: AsyncEngine, request_id: str, queue_: asyncio.Queue) -> None:
        self.owner, self.request_id, self._queue = owner, request_id, queue_
        self._done = False
        self._accepted = False

    async def _next_item(self) -> object:
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the client went away
            self.close()
            raise
        if isinstance(item, BaseException):  # RequestRejected or EngineDead: nothing left to abort
            self._done = True
            self.owner._release(self.request_id, finished=True)
            raise item
        return item

    async def accepted(self) -> None:
        """Wait for the engine's verdict: returns once it took the request, raises RequestRejected otherwise."""
        if not self._accepted:
            item = await self._next_item()
            assert item is _ACCEPTED, item  # the engine thread delivers the verdict before any output
            self._accepted = True

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        await self.accepted()
        item = await self._next_item()
        if item.finished:
            self._done = True
            self.owner._release(self.request_id, finished=True)
        return item

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.owner._release(self.request_id, finished=False)

    async def final(self) -> RequestOutput:
        """Wait for the last update (non-streaming requests)."""
        last = None
        async for last in self:
            pass
        return last
