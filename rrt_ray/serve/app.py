"""The Ray Serve application: an HTTP ingress deployment in front of a model deployment.

    client -> Serve proxy -> CompletionIngress (FastAPI: HTTP, validation, auth, SSE; no model)
                                 | DeploymentHandle, one streaming call per choice
                                 v
                             ModelServer x num_replicas (the model, the engine loop thread)

This module and `rrt_ray.serve.launch` are the only modules of `rrt_ray.serve` that import Ray. Three ways
to start it:

    python jobs/serve.py --model DIR|ROOT|s3://... [--port 8000] [--num-replicas N]   # local, binds 127.0.0.1
    serve run rrt_ray.serve.app:app_builder model=DIR num_replicas=2 engine.max_num_seqs=8
    serve deploy infra/serve/rrt_serve.yaml                                              # import_path + args

Arguments (one plain dict across the Ray boundary, rebuilt into typed configs inside each replica):
`model`, optional `model_name`, `num_replicas` and `num_cpus` (of the model deployment; <= 0.5 each on a
2-CPU machine), `ingress_num_cpus`, `torch_threads`, `engine` (EngineConfig fields) and `server`
(ServerSettings fields), nested or as dotted keys.

A model replica that dies (a crash, a kill, a lost node) takes no HTTP handler with it: the ingress sees
the handle call fail. A request that has sent nothing to its client yet (every non-streamed request, and a
stream before its first event) is retried on a healthy replica (`RemoteEngineClient`, up to
`RETRY_ATTEMPTS` times); when none takes it within `REPLICA_WAIT_S` the client gets a JSON 503 with
Retry-After. A stream that has already sent events ends with a JSON error event instead.

The API key is read from the ingress's environment (ServerSettings.api_key_env, default RRT_API_KEY):
set it on the cluster (e.g. from a Kubernetes Secret); it never travels in args, configs or logs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve import Application
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from rrt_ray.overrides import coerce, field_types
from rrt_ray.serve.api import ServerSettings
from rrt_ray.serve.client import EngineUnavailable, Generation, ModelCard, Refused
from rrt_ray.serve.engine import EngineConfig, RequestOutput

logger = logging.getLogger("rrt_ray.serve")

RETRY_ATTEMPTS = 3  # handle calls per request while replicas die (one more than replicas lost at once, for 2)
REPLICA_WAIT_S = 30.0  # a request waits this long for a model replica to take it, then gets 503
_REPLICA_LOST = (RayActorError, ReplicaUnavailableError, WorkerCrashedError)


@dataclasses.dataclass
class ServeAppConfig:
    """Everything the replicas need.

    model: a model path (`rrt_ray.model_source`: a model directory, a published root, s3://).
    num_replicas / num_cpus / num_gpus: model deployment replicas and the CPUs and GPUs each reserves
        (num_gpus places replicas on GPU workers; the engine computes on the model's device).
    ingress_num_cpus: CPUs the HTTP ingress replica reserves (it holds no model).
    """

    model: str
    model_name: str | None = None
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    ingress_num_cpus: float = 0.25
    torch_threads: int = 1
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    server: ServerSettings = dataclasses.field(default_factory=ServerSettings)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required: a Hugging Face model directory or an s3:// URI")
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)
        if isinstance(self.server, dict):
            self.server = ServerSettings(**self.server)
        if not 0 < self.num_cpus:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")
        if not 0 <= self.num_gpus:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if not 0 <= self.ingress_num_cpus:
            raise ValueError(f"ingress_num_cpus must be >= 0, got {self.ingress_num_cpus}")
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.model_name is None:
            self.model_name = Path(self.model.rstrip("/")).name or "rrt"
        self.server.model_name = self.model_name

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeAppConfig":
        """From nested dicts and/or dotted string keys (`serve run ... engine.max_num_seqs=8`)."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {"engine": {}, "server": {}}
        for key, value in args.items():
            section, _, name = key.partition(".")
            if name:
                if section not in nested:
                    raise ValueError(f"unknown argument {key!r}; dotted keys start with engine. or server.")
                nested[section][name] = value
            elif key in nested:
                nested[key].update(value or {})
            else:
                top[key] = value
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(top) - set(fields)
        if unknown:
            raise ValueError(f"unknown arguments {sorted(unknown)}; allowed: {', '.join(fields)}")
        top = {k: coerce(v, _field_type(cls, k), k) for k, v in top.items()}
        engine = {k: coerce(v, _field_type(EngineConfig, k), f"engine.{k}") for k, v in nested["engine"].items()}
        server = {k: coerce(v, _field_type(ServerSettings, k), f"server.{k}") for k, v in nested["server"].items()}
        return cls(**top, engine=EngineConfig(**engine), server=ServerSettings(**server))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_type(config_class, name: str) -> Any:
    types = field_types(config_class)
    if name not in types:
        raise ValueError(f"unknown {config_class.__name__} field {name!r}; allowed: {', '.join(types)}")
    return types[name]


def load_model(model: str):
    """(model, tokenizer or None) from a model path, weights from safetensors only (never unpickled)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rrt_ray.model_source import fetch_model, resolve_model

    local = fetch_model(resolve_model(model))
    loaded = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32, use_safetensors=True).eval()
    return loaded, load_tokenizer(local)


def load_tokenizer(local: Path):
    """The model directory's tokenizer, or None for a directory without one (token-id prompts only)."""
    from transformers import AutoTokenizer

    from rrt_ray.model_source import TOKENIZER_FILES

    if not any((Path(local) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(local)


_ACCEPTED = "accepted"  # ModelServer.generate's first item when the engine took the request


@dataclasses.dataclass(frozen=True)
class _Refusal:
    """ModelServer.generate's only item when the engine refused the request (plain data: no traceback)."""

    status: int
    message: str
    retry_after_s: int | None


@serve.deployment
class ModelServer:
    """One model replica: the model and the engine loop thread. Reached only through DeploymentHandles."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from rrt_ray.serve.async_engine import AsyncEngine
        from rrt_ray.serve.engine import Engine
        from rrt_ray.serve.metrics import EngineMetrics

        self.config = ServeAppConfig(**config)
        torch.set_num_threads(self.config.torch_threads)
        model, tokenizer = load_model(self.config.model)
        engine = Engine(model, tokenizer, self.config.engine)
        self.runner = AsyncEngine(engine, self.config.server.max_concurrent_requests, EngineMetrics(engine.num_loops))

    def card(self) -> ModelCard:
        return ModelCard(self.runner.engine.num_loops, self.runner.engine.max_model_len)

    def healthy(self) -> bool:
        return self.runner.alive

    def engine_metrics(self) -> bytes:
        return self.runner.metrics.exposition()

    def check_health(self) -> None:
        """Serve's health check: a dead engine loop gets this replica replaced."""
        if not self.runner.alive:
            raise RuntimeError(f"the engine loop stopped: {self.runner.error!r}")

    async def generate(self, generation: Generation) -> AsyncIterator[object]:
        """_ACCEPTED then RequestOutput updates, or one _Refusal. Cancelled by the ingress when its client goes."""
        from rrt_ray.serve.async_engine import EngineDead
        from rrt_ray.serve.client import start_local

        try:
            stream = await start_local(self.runner, generation.prompt_ids, generation.params)
        except Refused as err:
            yield _Refusal(err.status, err.message, err.retry_after_s)
            return
        try:
            yield _ACCEPTED
            async for out in stream:
                yield out
        except EngineDead as err:  # check_health fails next, and Serve replaces this replica
            yield _Refusal(503, str(err), 5)
        except asyncio.CancelledError:
            logger.debug("request %s cancelled by the ingress (its client went away)", stream.request_id)
            raise
        finally:
            stream.close()  # frees the KV row at the engine's next step when unfinished

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.shutdown()


class RemoteEngineClient:
    """The EngineClient of the ingress: the model deployment through a DeploymentHandle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle
        self._card: ModelCard | None = None

    async def card(self) -> ModelCard:
        if self._card is None:
            self._card = await self.handle.card.remote()
        return self._card

    async def healthy(self) -> bool:
        try:
            return await asyncio.wait_for(self.handle.healthy.remote(), timeout=5.0)
        except Exception:  # noqa: BLE001  (no replica answering in time is what "unhealthy" means)
            return False

    async def engine_metrics(self) -> bytes | None:
        try:
            return await asyncio.wait_for(self.handle.engine_metrics.remote(), timeout=5.0)
        except Exception:  # noqa: BLE001  (the HTTP metrics are still worth answering)
            return None

    async def start(self, generation: Generation, restartable: bool = False) -> "_RemoteStream":
        stream = _RemoteStream(self.handle, generation, restartable)
        await stream.open()
        return stream


class _RemoteStream:
    """One choice on the model deployment; reopened on another replica when its replica dies and
    nothing has reached the client yet (or always, when `restartable`)."""

    def __init__(self, handle: DeploymentHandle, generation: Generation, restartable: bool) -> None:
        self.handle, self.generation, self.restartable = handle, generation, restartable
        self._responses = None
        self._emitted = False
        self._done = False
        self._attempts = 0

    async def open(self) -> None:
        """Start the call on a replica and wait for the engine's verdict; Refused (400/503) otherwise."""
        while True:
            self._attempts += 1
            responses = self.handle.options(stream=True).generate.remote(self.generation)
            try:
                first = await asyncio.wait_for(responses.__anext__(), timeout=REPLICA_WAIT_S)
            except _REPLICA_LOST as err:
                responses.cancel()
                if self._attempts >= RETRY_ATTEMPTS:
                    raise Refused(503, f"no model replica could take the request ({type(err).__name__}); retry later", 2) from None
                logger.info("model replica lost before the request started (%s); retrying", type(err).__name__)
                await asyncio.sleep(0.2 * self._attempts)
                continue
            except asyncio.TimeoutError:
                responses.cancel()
                raise Refused(503, f"no model replica took the request within {REPLICA_WAIT_S:.0f} s; retry later", 5) from None
            except BaseException:
                responses.cancel()
                raise
            if isinstance(first, _Refusal):
                raise Refused(first.status, first.message, first.retry_after_s)
            self._responses = responses
            return

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            try:
                async for out in self._responses:
                    if isinstance(out, _Refusal):  # the replica's engine loop died
                        raise EngineUnavailable(out.message, out.retry_after_s or 5)
                    self._emitted = True
                    yield out
                self._done = True
                return
            except _REPLICA_LOST as err:
                if self._emitted and not self.restartable:
                    raise EngineUnavailable(f"the model replica was lost mid-stream ({type(err).__name__}); retry the request", 1) from None
                logger.info("model replica lost during a request that sent nothing yet (%s); retrying", type(err).__name__)
                try:
                    await self.open()
                except Refused as refused:
                    raise EngineUnavailable(refused.message, refused.retry_after_s or 1) from None

    async def aclose(self) -> None:
        if self._responses is not None and not self._done:
            self._done = True
            self._responses.cancel()  # cancels ModelServer.generate, which aborts the request in the engine


@serve.deployment
@serve.ingress()
class CompletionIngress:
    """The HTTP side: FastAPI app, validation, auth, SSE. It holds the tokenizer, never the model."""

    def __init__(self, config: dict[str, Any], model: DeploymentHandle) -> None:
        from rrt_ray.model_source import fetch_model, resolve_model

        self.config = ServeAppConfig(**config)
        self.tokenizer = load_tokenizer(fetch_model(resolve_model(self.config.model)))
        self.client = RemoteEngineClient(model)

    def __serve_build_asgi_app__(self):
        from rrt_ray.serve.api import build_app

        api_key = os.environ.get(self.config.server.api_key_env) or None
        return build_app(self.client, self.tokenizer, self.config.server, api_key)


def build_application(config: ServeAppConfig) -> Application:
    # The ingress must not queue requests ahead of the server's own limit: the engine answers 503 above it.
    # The margin keeps /healthz and /metrics reachable while the limit is reached.
    max_ongoing = config.server.max_concurrent_requests + 16
    model = ModelServer.options(
        num_replicas=config.num_replicas, ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=max_ongoing, health_check_period_s=5.0,
    ).bind(config.to_dict())
    return CompletionIngress.options(
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        max_ongoing_requests=max_ongoing * config.num_replicas,
    ).bind(config.to_dict(), model)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder (import path `rrt_ray.serve.app:app_builder`)."""
    return build_application(ServeAppConfig.from_args(args))
