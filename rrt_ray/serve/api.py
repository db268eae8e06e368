"""The HTTP layer (FastAPI, no Ray): OpenAI completions over an EngineClient (`rrt_ray.serve.client`).

    POST /v1/completions         prompt text or token ids (or a list of either: one choice each)
    POST /v1/chat/completions    when the tokenizer has a chat template
    GET  /v1/models              the one served model
    GET  /healthz                200 while the engine answers, 503 otherwise (no API key needed)
    GET  /metrics                Prometheus text format (no API key needed)

Every error is JSON, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (malformed
JSON, wrong types, out-of-range values, text that is not valid Unicode, over-long prompts), 401 for a
missing or wrong API key, 404 for an unknown model or route, 405 for a wrong method, 503 (with
Retry-After) at the concurrency limit or while no engine replica can take the request. A 5xx other than
503 means a server bug. Streaming uses server-sent events ("data: {...}" lines, then "data: [DONE]"); an
engine lost after the first event ends the stream with an error event.

A request is validated once, here: the JSON body by the pydantic models of `rrt_ray.serve.protocol`, then
turned into typed `Generation`s (token ids + SamplingParams) that the engine takes as they are. A client
that goes away is counted as `status="cancelled"` and logged at DEBUG, never as a server error.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from rrt_ray.serve.client import EngineClient, EngineUnavailable, Generation, ModelCard, OutputStream, Refused
from rrt_ray.serve.metrics import CONTENT_TYPE_LATEST, RequestMetrics
from rrt_ray.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("rrt_ray.serve")

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error", 503: "overloaded_error"}
_STATUS_LABELS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "bad_request", 413: "bad_request", 503: "overloaded"}


@dataclass
class ServerSettings:
    """Limits and defaults of the HTTP layer.

    model_name: the id /v1/models lists and requests must name (when they name one).
    max_prompt_tokens / max_tokens_limit: per-request limits (400 above them).
    max_concurrent_requests: requests (choices) in flight at once per model replica; more get 503.
    default_exit_threshold: used when a request sends no exit_threshold (1.0: no early exit).
    api_key_env: environment variable holding the bearer API key; unset or empty: no key required.
    max_body_bytes: larger request bodies get 413.
    max_n: choices one request may ask for with `n` (400 above).
    """

    model_name: str = "rrt"
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 512
    max_concurrent_requests: int = 64
    default_exit_threshold: float = 1.0
    api_key_env: str = "RRT_API_KEY"
    max_body_bytes: int = 1_000_000
    max_n: int = 8

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens_limit", "max_concurrent_requests", "max_body_bytes", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.default_exit_threshold <= 1.0:
            raise ValueError(f"default_exit_threshold must be in [0, 1], got {self.default_exit_threshold}")


class _Outcome:
    """Counts one HTTP request once, whichever of the handler, the stream or an exception handler ends it."""

    def __init__(self, metrics: RequestMetrics) -> None:
        self.metrics, self.recorded = metrics, False
        self.started = time.perf_counter()

    def record(self, status: str) -> None:
        if not self.recorded:
            self.recorded = True
            self.metrics.count(status, self.started if status == "ok" else None)


@dataclass(frozen=True)
class _Call:
    """One validated HTTP request on its way to the engine."""

    generations: list[Generation]
    stream: bool
    include_usage: bool
    chat: bool
    outcome: _Outcome
    echo: bool = False  # completions: the prompt (and its log-probs) before the completion
    logprobs: bool = False  # choices carry log-probs (legacy completions format, or chat's)


def _is_cancellation(err: BaseException) -> bool:
    """A client that went away: asyncio's CancelledError, or Ray's TaskCancelledError (seen by name: no Ray here)."""
    return isinstance(err, asyncio.CancelledError) or any(c.__name__ in ("TaskCancelledError", "RequestCancelledError") for c in type(err).__mro__)


class CompletionAPI:
    """The routes, each a named handler over one EngineClient; `.app` is the FastAPI application.

    api_key: the required bearer token (None or "": open). It is never logged.
    """

    def __init__(self, client: EngineClient, tokenizer, settings: ServerSettings, api_key: str | None = None) -> None:
        self.client, self.tokenizer, self.settings, self.api_key = client, tokenizer, settings, api_key or None
        self.metrics = RequestMetrics()
        self.has_chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        self.app = FastAPI(title="rrt-ray", docs_url=None, redoc_url=None, openapi_url=None)
        self._add_routes(self.app)

    def _add_routes(self, app: FastAPI) -> None:
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(StarletteHTTPException, self._http_error)
        app.add_exception_handler(RequestValidationError, self._request_validation)
        app.add_exception_handler(Exception, self._server_error)
        app.add_middleware(_ClientGone)
        app.add_api_route("/healthz", self.healthz, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_endpoint, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])

    # ------------------------------------------------------------------ errors

    def outcome(self, request: Request) -> _Outcome:
        if not hasattr(request.state, "rrt_outcome"):
            request.state.rrt_outcome = _Outcome(self.metrics)
        return request.state.rrt_outcome

    def error_response(self, request: Request, err: APIError) -> JSONResponse:
        self.outcome(request).record(_STATUS_LABELS.get(err.status, "error"))
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def _api_error(self, request: Request, err: APIError) -> JSONResponse:
        return self.error_response(request, err)

    async def _http_error(self, request: Request, err: StarletteHTTPException) -> JSONResponse:
        type_ = _STATUS_TYPES.get(err.status_code, "invalid_request_error")
        return self.error_response(request, APIError(err.status_code, str(err.detail), type_))

    async def _request_validation(self, request: Request, err: RequestValidationError) -> JSONResponse:
        return self.error_response(request, APIError(400, str(err.errors()[0].get("msg", "invalid request"))))

    async def _server_error(self, request: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error")
        self.outcome(request).record("error")
        body = APIError(500, f"internal server error: {type(err).__name__}", "server_error").body()
        return JSONResponse(body, status_code=500)

    # ------------------------------------------------------------------ checks at the edge

    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        body = await request.body()
        limit = self.settings.max_body_bytes
        if len(body) > limit:
            raise APIError(413, f"request body is {len(body)} bytes; the limit is {limit}")
        try:
            data = json.loads(body)
            bad_text = protocol.unencodable_field(data)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, 5000-digit ints, deep nesting
            raise APIError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        if bad_text:
            path, problem = bad_text
            raise APIError(400, f"{path}: {problem}", param=path.split(".")[0])
        return data

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.settings.model_name!r}", "not_found_error", "model", "model_not_found")

    def encode(self, prompt: str | list[int], field: str = "prompt") -> tuple[int, ...]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, f"{field}: this model has no tokenizer; send token ids", param=field)
            try:
                ids = self.tokenizer.encode(prompt)
            except (TypeError, ValueError) as err:  # text the tokenizer cannot take is the request's fault
                raise APIError(400, f"{field}: the tokenizer cannot encode it ({err})", param=field) from None
        else:
            ids = prompt
        if not ids:
            raise APIError(400, f"{field}: must not be empty", param=field)
        limit = self.settings.max_prompt_tokens
        if len(ids) > limit:
            raise APIError(400, f"{field}: {len(ids)} tokens is above this server's limit of {limit}", param=field, code="context_length_exceeded")
        return tuple(ids)

    def sampling(self, req):
        max_tokens, limit = req.max_new_tokens(), self.settings.max_tokens_limit
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        if max_tokens > limit:
            raise APIError(400, f"{field}: {max_tokens} is above this server's limit of {limit}", param=field)
        if req.stop is not None and self.tokenizer is None:
            raise APIError(400, "stop: this model has no tokenizer, so stop strings cannot be matched", param="stop")
        try:
            return req.sampling_params(self.settings.default_exit_threshold)
        except ValueError as err:
            message = str(err)
            raise APIError(400, message, param=message.split(":")[0].split(" ")[0]) from None

    @staticmethod
    def parse(model_class, data: dict):
        try:
            return model_class.model_validate(data)
        except ValidationError as err:
            raise protocol.validation_error(err) from None

    # ------------------------------------------------------------------ routes

    async def healthz(self):
        if not await self.client.healthy():
            return JSONResponse(APIError(503, "the engine is not running", "server_error").body(), status_code=503)
        return {"status": "ok", "model": self.settings.model_name}

    async def metrics_endpoint(self):
        engine = await self.client.engine_metrics()
        return Response(self.metrics.exposition() + (engine or b""), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request):
        self.check_auth(request)
        card: ModelCard = await self.client.card()
        entry = {
            "id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "rrt-ray",
            "num_loops": card.num_loops, "max_model_len": card.max_model_len,
        }
        return {"object": "list", "data": [entry]}

    async def completions(self, request: Request):
        outcome = self.outcome(request)  # its clock starts here
        self.check_auth(request)
        req: CompletionRequest = self.parse(CompletionRequest, await self.read_json(request))
        try:
            prompts = req.prompts()
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from None
        self.check_model(req.model)
        limit = self.settings.max_concurrent_requests
        if len(prompts) > limit:
            raise APIError(400, f"prompt: {len(prompts)} prompts in one request; the limit is {limit}", param="prompt")
        ids = [self.encode(p) for p in prompts]
        params = self.sampling(req)
        # echo is answered whole (the prompt's scores come at once, and lm-eval never streams): refused streamed
        self.check_choices(req, len(ids), streamed=("echo",) if req.echo else ())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        generations = [Generation(i, p) for i in ids for p in self.choices(params, req.n)]
        call = _Call(generations, req.stream, include_usage, False, outcome, echo=req.echo, logprobs=req.logprobs is not None)
        return await self.run(call)

    def check_choices(self, req, num_prompts: int, streamed: tuple[str, ...]) -> None:
        """n within the server's limit; fields this server answers only without streaming."""
        if req.n > self.settings.max_n:
            raise APIError(400, f"n: {req.n} is above this server's limit of {self.settings.max_n}", param="n")
        if num_prompts * req.n > self.settings.max_concurrent_requests:
            raise APIError(400, f"n: {num_prompts} prompts x n={req.n} choices is above the limit of {self.settings.max_concurrent_requests}", param="n")
        if req.stream and streamed:
            raise APIError(400, f"{streamed[0]}: not supported with stream=true on this server", param=streamed[0])

    @staticmethod
    def choices(params, n: int) -> list:
        """n independent choices: seeded requests get seeds seed, seed + 1, ... (reproducible, different)."""
        if n == 1 or params.seed is None:
            return [params] * n
        return [dataclasses.replace(params, seed=(params.seed + i) % 2**63) for i in range(n)]

    async def chat_completions(self, request: Request):
        outcome = self.outcome(request)
        self.check_auth(request)
        if not self.has_chat:
            raise APIError(404, "this model's tokenizer has no chat template; use /v1/completions", "not_found_error")
        req: ChatCompletionRequest = self.parse(ChatCompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        messages = [m.model_dump() for m in req.messages]
        try:
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # noqa: BLE001  (a template that rejects these messages is the request's fault)
            raise APIError(400, f"messages: the chat template rejected them: {err}", param="messages") from None
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        params = self.sampling(req)
        self.check_choices(req, 1, streamed=())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        prompt = self.encode(list(ids), "messages")
        generations = [Generation(prompt, p) for p in self.choices(params, req.n)]
        call = _Call(generations, req.stream, include_usage, True, outcome, logprobs=bool(req.logprobs))
        return await self.run(call)

    # ------------------------------------------------------------------ running a request

    async def start_all(self, call: _Call) -> list[OutputStream]:
        """Start every choice, or none: a refusal closes the ones already started and answers 4xx/503."""
        streams: list[OutputStream] = []
        try:
            for generation in call.generations:
                streams.append(await self.client.start(generation, restartable=not call.stream))
        except BaseException as err:
            for stream in streams:
                await stream.aclose()
            if isinstance(err, Refused):
                headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None
                type_ = "invalid_request_error" if err.status < 500 else "overloaded_error"
                param = ("max_loops" if "max_loops" in err.message else "prompt") if err.status == 400 else None
                raise APIError(err.status, err.message, type_, param, headers=headers) from None
            raise
        return streams

    async def run(self, call: _Call):
        streams = await self.start_all(call)
        request_id = protocol.new_id("chatcmpl" if call.chat else "cmpl")
        if call.stream:
            events = self.sse(streams, request_id, call)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            finals = await asyncio.gather(*(_final(s) for s in streams))
        except EngineUnavailable as err:
            call.outcome.record("unavailable")
            raise APIError(503, str(err), "server_error", code="engine_unavailable", headers={"Retry-After": str(err.retry_after_s)}) from None
        except asyncio.CancelledError as err:
            cancelled(call.outcome, err)
            raise
        finally:
            for s in streams:
                await s.aclose()
        choices = [self.final_choice(i, f, call) for i, f in enumerate(finals)]
        tokens = protocol.usage(sum(f.num_prompt_tokens for f in finals), sum(len(f.token_ids) for f in finals))
        body = protocol.completion_body(request_id, self.settings.model_name, choices, tokens, call.chat)
        call.outcome.record("ok")
        return JSONResponse(body)

    def final_choice(self, index: int, out, call: _Call) -> dict:
        """One non-streamed choice: text (after the prompt's, with echo), exit loops, log-probs, drafts."""
        text, prompt_text = out.text, ""
        extra = {"drafted_tokens": out.drafted, "accepted_drafts": out.accepted} if out.drafted else {}
        if call.echo:
            prompt_ids = list(call.generations[index].prompt_ids)
            prompt_text = self.tokenizer.decode(prompt_ids) if self.tokenizer is not None else ""
            text = prompt_text + text
        logprobs = None
        if call.logprobs and call.chat:
            logprobs = protocol.chat_logprobs(self.tokenizer, out.token_ids, out.logprobs, out.top_logprobs)
        elif call.logprobs:
            ids, lps, tops = list(out.token_ids), list(out.logprobs), list(out.top_logprobs or [{}] * len(out.token_ids))
            if call.echo:
                ids = list(call.generations[index].prompt_ids) + ids
                lps = list(out.prompt_logprobs) + lps
                tops = list(out.prompt_top_logprobs) + tops
            logprobs = protocol.completion_logprobs(self.tokenizer, ids, lps, tops)
        return protocol.choice(index, text, out.finish_reason, out.exit_loops, call.chat, logprobs=logprobs, extra=extra)

    def chunk_logprobs(self, out, call: _Call, offsets: list[int], index: int) -> dict:
        """The log-probs of a chunk's new tokens, in the format of the non-streamed choice (their concatenation
        over a stream is the non-streamed answer); advances the choice's text offset."""
        n = len(out.new_token_ids)
        lps = out.logprobs[-n:]
        tops = out.top_logprobs[-n:] if out.top_logprobs else [{}] * n
        if call.chat:
            return protocol.chat_logprobs(self.tokenizer, out.new_token_ids, lps, tops)
        body = protocol.completion_logprobs(self.tokenizer, out.new_token_ids, lps, tops, offset=offsets[index])
        offsets[index] = body["text_offset"][-1] + len(body["tokens"][-1])
        return body

    async def sse(self, streams: list[OutputStream], request_id: str, call: _Call) -> AsyncIterator[str]:
        model, chat = self.settings.model_name, call.chat
        prompt_tokens = completion_tokens = 0
        offsets = [0] * len(streams)  # per choice: text_offset of its next token (legacy completions format)
        try:
            if chat:  # the first chunk carries the role, as OpenAI's does
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                yield _event(protocol.completion_body(request_id, model, [first], None, chat, chunk=True))
            async for index, out in _merged(streams):
                new_loops = out.exit_loops[len(out.exit_loops) - len(out.new_token_ids) :]
                if not out.new_text and not out.finished and not new_loops:
                    continue
                logprobs = self.chunk_logprobs(out, call, offsets, index) if call.logprobs and out.new_token_ids else None
                choice = protocol.choice(index, out.new_text, out.finish_reason, new_loops, chat, delta=True, logprobs=logprobs)
                yield _event(protocol.completion_body(request_id, model, [choice], None, chat, chunk=True))
                if out.finished:
                    prompt_tokens += out.num_prompt_tokens
                    completion_tokens += len(out.token_ids)
            if call.include_usage:
                yield _event(protocol.completion_body(request_id, model, [], protocol.usage(prompt_tokens, completion_tokens), chat, chunk=True))
            call.outcome.record("ok")
        except EngineUnavailable as err:  # after the first event: the client must retry the whole request
            call.outcome.record("unavailable")
            yield _event(APIError(503, str(err), "server_error", code="engine_unavailable").body())
        except BaseException as err:
            if _is_cancellation(err) or isinstance(err, GeneratorExit):
                cancelled(call.outcome, err)
                raise
            if not isinstance(err, Exception):
                raise
            logger.exception("internal error in a stream")  # a server bug: the client still gets JSON
            call.outcome.record("error")
            yield _event(APIError(500, f"internal server error: {type(err).__name__}", "server_error").body())
        finally:
            for stream in streams:
                await stream.aclose()
        yield "data: [DONE]\n\n"


class _ClientGone:
    """ASGI middleware (inside Starlette's ServerErrorMiddleware): a request that fails because its client
    went away (Ray Serve raises TaskCancelledError from `receive()`) ends quietly, counted as cancelled,
    instead of reaching the 500 handler, which would log it and re-raise it into the server."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as err:
            if not _is_cancellation(err):
                raise
            outcome = scope.get("state", {}).get("rrt_outcome")
            if outcome is None:
                logger.debug("client went away (%s)", type(err).__name__)
            else:
                cancelled(outcome, err)


def cancelled(outcome: _Outcome, err: BaseException) -> None:
    """A client that went away: one DEBUG line, counted as status="cancelled" (never an error)."""
    if not outcome.recorded:
        logger.debug("client went away; request cancelled (%s)", type(err).__name__)
    outcome.record("cancelled")


def build_app(client: EngineClient, tokenizer, settings: ServerSettings, api_key: str | None = None) -> FastAPI:
    """The FastAPI app of `CompletionAPI` (see its docstring)."""
    return CompletionAPI(client, tokenizer, settings, api_key).app


async def _final(stream: OutputStream):
    """The last update of a stream: every update holds all tokens so far (non-streaming requests)."""
    last = None
    async for last in stream:
        pass
    return last


async def _merged(streams: list[OutputStream]) -> AsyncIterator[tuple[int, object]]:
    """(choice index, RequestOutput) from several streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: OutputStream) -> None:
        try:
            async for out in stream:
                await merged.put((index, out))
        except BaseException as err:  # noqa: BLE001  (handed to the reader, who raises it)
            await merged.put((index, err))
            return
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
        await asyncio.gather(*tasks, return_exceptions=True)  # retrieve them: no "exception never retrieved"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
