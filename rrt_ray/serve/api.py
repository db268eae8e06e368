"""The HTTP layer (FastAPI, no Ray): OpenAI completions over an AsyncEngine.

    POST /v1/completions         prompt text or token ids (or a list of either: one choice each)
    POST /v1/chat/completions    when the tokenizer has a chat template
    GET  /v1/models              the one served model
    GET  /healthz                200 while the engine loop runs, 503 otherwise (no API key needed)
    GET  /metrics                Prometheus text format (no API key needed)

Every error is JSON, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (malformed
JSON, wrong types, out-of-range values, over-long prompts), 401 for a missing or wrong API key, 404
for an unknown model or route, 503 at the concurrency limit. A 5xx other than 503 means a server bug.
Streaming uses server-sent events ("data: {...}" lines, then "data: [DONE]").
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rrt_ray.serve import protocol
from rrt_ray.serve.async_engine import AsyncEngine, EngineDead, Overloaded, RequestStream
from rrt_ray.serve.metrics import CONTENT_TYPE_LATEST
from rrt_ray.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from rrt_ray.serve.sampling import SamplingParams

logger = logging.getLogger("rrt_ray.serve")

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error", 503: "overloaded_error"}
_STATUS_LABELS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "bad_request", 503: "overloaded"}


@dataclass
class ServerSettings:
    """Limits and defaults of the HTTP layer.

    model_name: the id /v1/models lists and requests must name (when they name one).
    max_prompt_tokens / max_tokens_limit: per-request limits (400 above them).
    max_concurrent_requests: requests (choices) in flight at once; more get 503.
    default_exit_threshold: used when a request sends no exit_threshold (1.0: no early exit).
    api_key_env: environment variable holding the bearer API key; unset or empty: no key required.
    max_body_bytes: larger request bodies get 413.
    """

    model_name: str = "rrt"
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 512
    max_concurrent_requests: int = 64
    default_exit_threshold: float = 1.0
    api_key_env: str = "RRT_API_KEY"
    max_body_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens_limit", "max_concurrent_requests", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.default_exit_threshold <= 1.0:
            raise ValueError(f"default_exit_threshold must be in [0, 1], got {self.default_exit_threshold}")


def build_app(runner: AsyncEngine, tokenizer, settings: ServerSettings, api_key: str | None = None) -> FastAPI:
    """The FastAPI app. api_key: required bearer token (None or "": open). It is never logged."""
    app = FastAPI(title="rrt-ray", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = runner.metrics
    engine = runner.engine
    has_chat = tokenizer is not None and getattr(tokenizer, "chat_template", None)

    def count(status: str) -> None:
        if metrics is not None:
            metrics.requests.labels(status=status).inc()

    def error_response(err: APIError) -> JSONResponse:
        count(_STATUS_LABELS.get(err.status, "error"))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(err.status_code, str(err.detail), _STATUS_TYPES.get(err.status_code, "invalid_request_error")))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, str(err.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(Exception)
    async def _server_error(_: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error")
        count("error")
        body = APIError(500, f"internal server error: {type(err).__name__}", "server_error").body()
        return JSONResponse(body, status_code=500)

    def check_auth(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        body = await request.body()
        if len(body) > settings.max_body_bytes:
            raise APIError(413, f"request body is {len(body)} bytes; the limit is {settings.max_body_bytes}")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, 5000-digit ints, deep nesting
            raise APIError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        return data

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}", "not_found_error", "model", "model_not_found")

    def sampling(req, max_tokens: int) -> SamplingParams:
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens: {max_tokens} is above this server's limit of {settings.max_tokens_limit}", param="max_tokens")
        if req.max_loops is not None and req.max_loops > engine.num_loops:
            raise APIError(400, f"max_loops: must be in 1..{engine.num_loops} for this model, got {req.max_loops}", param="max_loops")
        try:
            stop = req.stop_list()
        except ValueError as err:
            raise APIError(400, str(err), param="stop") from None
        if stop and tokenizer is None:
            raise APIError(400, "stop: this model has no tokenizer, so stop strings cannot be matched", param="stop")
        threshold = settings.default_exit_threshold if req.exit_threshold is None else req.exit_threshold
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop,
                exit_threshold=threshold, max_loops=req.max_loops,
            )
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise APIError(400, "prompt: this model has no tokenizer; send token ids", param="prompt")
            ids = tokenizer.encode(prompt)
        else:
            ids = prompt
        if not ids:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(400, f"prompt: {len(ids)} tokens is above this server's limit of {settings.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        return ids

    def submit_all(prompts: list[list[int]], params: SamplingParams) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for ids in prompts:
                streams.append(runner.submit(ids, params))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    async def handle(prompts: list[list[int]], params: SamplingParams, model: str, stream: bool, include_usage: bool, chat: bool):
        started = time.perf_counter()
        try:
            streams = submit_all(prompts, params)
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from None
        except Overloaded as err:
            raise APIError(503, str(err), "overloaded_error") from None
        except EngineDead as err:
            raise APIError(503, str(err), "server_error") from None
        request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        if stream:
            events = _sse(streams, request_id, model, include_usage, chat, started, metrics)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            finals = await asyncio.gather(*(s.final() for s in streams))
        except EngineDead as err:
            raise APIError(503, str(err), "server_error") from None
        finally:
            for s in streams:
                s.close()
        choices = [protocol.choice(i, f.text, f.finish_reason, f.exit_loops, chat) for i, f in enumerate(finals)]
        body = protocol.completion_body(
            request_id, model, choices,
            protocol.usage(sum(f.num_prompt_tokens for f in finals), sum(len(f.token_ids) for f in finals)), chat,
        )
        count("ok")
        if metrics is not None:
            metrics.request_seconds.observe(time.perf_counter() - started)
        return JSONResponse(body)

    @app.get("/healthz")
    async def healthz():
        if not runner.alive:
            return JSONResponse(APIError(503, "engine loop is not running", "server_error").body(), status_code=503)
        return {"status": "ok", "model": settings.model_name}

    @app.get("/metrics")
    async def metrics_endpoint():
        if metrics is None:
            raise APIError(404, "metrics are disabled", "not_found_error")
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        card = {
            "id": settings.model_name, "object": "model", "created": 0, "owned_by": "rrt-ray",
            "num_loops": engine.num_loops, "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        try:
            req = CompletionRequest.model_validate(await read_json(request))
            prompts = req.prompts()
        except ValidationError as err:
            raise protocol.validation_error(err) from None
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from None
        check_model(req.model)
        if len(prompts) > settings.max_concurrent_requests:
            raise APIError(400, f"prompt: {len(prompts)} prompts in one request; the limit is {settings.max_concurrent_requests}", param="prompt")
        ids = [encode(p) for p in prompts]
        params = sampling(req, req.max_tokens)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await handle(ids, params, settings.model_name, req.stream, include_usage, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        if not has_chat:
            raise APIError(404, "this model's tokenizer has no chat template; use /v1/completions", "not_found_error")
        try:
            req = ChatCompletionRequest.model_validate(await read_json(request))
        except ValidationError as err:
            raise protocol.validation_error(err) from None
        check_model(req.model)
        messages = [m.model_dump() for m in req.messages]
        try:
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # noqa: BLE001  (a template that rejects these messages is the request's fault)
            raise APIError(400, f"messages: the chat template rejected them: {err}", param="messages") from None
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        params = sampling(req, req.token_budget(16))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await handle([encode(list(ids))], params, settings.model_name, req.stream, include_usage, chat=True)

    return app


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, object]]:
    """(choice index, RequestOutput) from several streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await merged.put((index, out))
        except BaseException as err:  # noqa: BLE001
            await merged.put((index, err))
        await merged.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _sse(streams, request_id, model, include_usage, chat, started, metrics) -> AsyncIterator[str]:
    prompt_tokens = completion_tokens = 0
    try:
        if chat:  # the first chunk carries the role, as OpenAI's does
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield _event(protocol.completion_body(request_id, model, [first], None, chat, chunk=True))
        async for index, out in _merged(streams):
            new_loops = out.exit_loops[len(out.exit_loops) - len(out.new_token_ids) :]
            if not out.new_text and not out.finished and not new_loops:
                continue
            choice = protocol.choice(index, out.new_text, out.finish_reason, new_loops, chat, delta=True)
            yield _event(protocol.completion_body(request_id, model, [choice], None, chat, chunk=True))
            if out.finished:
                prompt_tokens += out.num_prompt_tokens
                completion_tokens += len(out.token_ids)
        if include_usage:
            yield _event(protocol.completion_body(request_id, model, [], protocol.usage(prompt_tokens, completion_tokens), chat, chunk=True))
        if metrics is not None:
            metrics.requests.labels(status="ok").inc()
            metrics.request_seconds.observe(time.perf_counter() - started)
    except EngineDead as err:
        yield _event(APIError(503, str(err), "server_error").body())
    finally:
        for stream in streams:
            stream.close()
    yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
