"""The Ray Serve deployment: a thin wrapper that loads the model and serves `rrt_ray.serve.api` on it.

This is the only module of `rrt_ray.serve` that imports Ray. Three ways to start it:

    python jobs/serve.py --model DIR|s3://... [--port 8000]                 # local, binds 127.0.0.1
    serve run rrt_ray.serve.app:app_builder model=DIR engine.max_num_seqs=8
    serve deploy infra/serve/rrt_serve.yaml                                 # import_path + args

Arguments (one plain dict across the Ray boundary, rebuilt into typed configs inside the replica):
`model`, optional `model_name`, `num_cpus` (per replica; <= 1 on a 2-CPU machine), `torch_threads`,
`engine` (EngineConfig fields) and `server` (ServerSettings fields), nested or as dotted keys.

The API key is read from the replica's environment (ServerSettings.api_key_env, default RRT_API_KEY):
set it on the cluster (e.g. from a Kubernetes Secret); it never travels in args, configs or logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from rrt_ray.overrides import coerce, field_types
from rrt_ray.serve.engine import EngineConfig
from rrt_ray.serve.api import ServerSettings


@dataclasses.dataclass
class ServeAppConfig:
    """Everything one replica needs. model: a local Hugging Face directory or an s3:// URI."""

    model: str
    model_name: str | None = None
    num_cpus: float = 1.0
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
    """(model, tokenizer or None) from a local directory or an s3:// URI (downloaded once, checksummed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rrt_ray  # noqa: F401  (registers the recursive model)
    from rrt_ray import storage

    local = model
    if storage.is_remote(model):
        local = os.path.join(tempfile.gettempdir(), "rrt-serve-models", hashlib.sha256(model.encode()).hexdigest()[:16])
        if not os.path.exists(os.path.join(local, "config.json")):
            storage.download_dir(model, local)
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise ValueError(f"model {model!r} is not a Hugging Face model directory (no config.json)")
    loaded = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError, TypeError):  # a directory without tokenizer files: token-id prompts only
        tokenizer = None
    return loaded, tokenizer


@serve.deployment
@serve.ingress()
class CompletionServer:
    """One replica: the model, the engine loop thread, and the FastAPI app around them."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from rrt_ray.serve.async_engine import AsyncEngine
        from rrt_ray.serve.engine import Engine
        from rrt_ray.serve.metrics import EngineMetrics

        self.config = ServeAppConfig(**config)
        torch.set_num_threads(self.config.torch_threads)
        model, self.tokenizer = load_model(self.config.model)
        engine = Engine(model, self.tokenizer, self.config.engine)
        self.runner = AsyncEngine(engine, self.config.server.max_concurrent_requests, EngineMetrics(engine.num_loops))

    def __serve_build_asgi_app__(self):
        from rrt_ray.serve.api import build_app
        from rrt_ray.serve.client import LocalEngineClient

        api_key = os.environ.get(self.config.server.api_key_env) or None
        return build_app(LocalEngineClient(self.runner), self.tokenizer, self.config.server, api_key)

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.shutdown()


def build_application(config: ServeAppConfig) -> Application:
    # Serve must not queue requests ahead of the server's own limit: it answers 503 above it.
    # The margin keeps /healthz and /metrics reachable while the limit is reached.
    max_ongoing = config.server.max_concurrent_requests + 16
    return CompletionServer.options(
        ray_actor_options={"num_cpus": config.num_cpus}, max_ongoing_requests=max_ongoing,
        health_check_period_s=5.0,
    ).bind(config.to_dict())


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder (import path `rrt_ray.serve.app:app_builder`)."""
    return build_application(ServeAppConfig.from_args(args))
