"""What the HTTP layer needs from an engine, in one small interface (no Ray here).

    card = await client.card()                  # ModelCard: loops, max_model_len, vocabulary
    stream = await client.start(generation)     # raises Refused (4xx/503) before anything is sent
    async for out in stream: ...                # RequestOutput updates; EngineUnavailable if the engine is lost
    await stream.aclose()                       # aborts the request in the engine when it is not finished

`LocalEngineClient` wraps an in-process AsyncEngine (tests, notebooks); `rrt_ray.serve.app.RemoteEngineClient`
reaches the model deployment through a Ray Serve DeploymentHandle and retries on a healthy replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from rrt_ray.serve.async_engine import AsyncEngine, EngineDead, Overloaded, RequestRejected
from rrt_ray.serve.engine import RequestOutput
from rrt_ray.serve.sampling import SamplingParams


@dataclass(frozen=True)
class ModelCard:
    """The engine facts the HTTP layer shows (/v1/models) and needs."""

    num_loops: int
    max_model_len: int


@dataclass(frozen=True)
class Generation:
    """One choice to generate: validated token ids and sampling settings (typed, built once at the edge)."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams


class Refused(Exception):
    """The engine would not take a request: `status` 400 (the request's fault) or 503 (retry later)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


class EngineUnavailable(Exception):
    """The engine was lost while a request ran (a crashed loop, a dead replica): a retryable server fault."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OutputStream(Protocol):
    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def aclose(self) -> None: ...


class EngineClient(Protocol):
    async def card(self) -> ModelCard: ...

    async def healthy(self) -> bool: ...

    async def engine_metrics(self) -> bytes | None: ...

    async def start(self, generation: Generation, restartable: bool = False) -> OutputStream:
        """restartable: the caller only reads the last update (every update holds all tokens so far),
        so a lost engine may restart the request from scratch on another replica."""
        ...


def refusal(err: Exception) -> Refused:
    """Overloaded / EngineDead / RequestRejected as the Refused the HTTP layer answers."""
    if isinstance(err, RequestRejected):
        return Refused(400, str(err))
    if isinstance(err, Overloaded):
        return Refused(503, str(err), retry_after_s=1)
    return Refused(503, str(err), retry_after_s=5)


class _LocalStream:
    def __init__(self, stream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self._stream:
                yield out
        except EngineDead as err:
            raise EngineUnavailable(str(err), retry_after_s=5) from None

    async def aclose(self) -> None:
        self._stream.close()


class LocalEngineClient:
    """An AsyncEngine in this process."""

    def __init__(self, runner: AsyncEngine) -> None:
        self.runner = runner

    async def card(self) -> ModelCard:
        return ModelCard(self.runner.engine.num_loops, self.runner.engine.max_model_len)

    async def healthy(self) -> bool:
        return self.runner.alive

    async def engine_metrics(self) -> bytes | None:
        return None if self.runner.metrics is None else self.runner.metrics.exposition()

    async def start(self, generation: Generation, restartable: bool = False) -> _LocalStream:
        return _LocalStream(await start_local(self.runner, generation.prompt_ids, generation.params))


async def start_local(runner: AsyncEngine, prompt_ids: Sequence[int], params: SamplingParams):
    """Submit and wait for the engine's verdict; Refused when it does not take the request."""
    try:
        stream = runner.submit(prompt_ids, params)
    except (Overloaded, EngineDead) as err:
        raise refusal(err) from None
    try:
        await stream.accepted()
    except (RequestRejected, EngineDead) as err:
        raise refusal(err) from None
    except BaseException:
        stream.close()
        raise
    return stream
