"""The OpenAI completions wire format: request models (strictly typed), response bodies, error bodies.

Requests are validated strictly (a string where a number belongs is a 400, never coerced) and
unknown fields are ignored, as the OpenAI API does for clients that send newer fields.

rrt extensions (send them in the body, e.g. `extra_body=` with the openai client):
    exit_threshold  early-exit confidence threshold in [0, 1] (1 = never exit early)
    max_loops       loops a generated token may run at most
    exit_mode       "confidence" (early exit by exit_threshold), "speculative" (lossless self-speculative
                    decoding) or "none" (full depth)
    draft_tokens    tokens the loop-1 exit drafts per speculative round (>= 1)
and every choice carries `exit_loops`: the loops each generated token ran.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from rrt_ray.serve.sampling import EXIT_MODES, MAX_LOGPROBS

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rrt_ray.serve.sampling import SamplingParams

Prompt = str | list[str] | list[int] | list[list[int]]
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; chat uses it when neither limit is sent


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)  # the server's own limit is checked by the HTTP layer
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    user: str | None = None
    exit_threshold: float | None = Field(None, ge=0.0, le=1.0)
    max_loops: int | None = Field(None, ge=1)
    exit_mode: Literal[EXIT_MODES] | None = None
    draft_tokens: int | None = Field(None, ge=1)

    def stop_list(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return tuple(stops)

    def max_new_tokens(self) -> int:
        raise NotImplementedError

    def logprob_fields(self) -> dict:
        """SamplingParams' logprobs / prompt_logprobs for this request (none by default)."""
        return {}

    def sampling_params(self, default_exit_threshold: float) -> SamplingParams:
        """The engine's settings for this request: every field maps here, once.

        default_exit_threshold: the server's (ServerSettings) value for requests that send none.
        Raises ValueError naming the field (the HTTP layer answers 400).
        """
        return SamplingParams(
            max_tokens=self.max_new_tokens(), temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            stop=self.stop_list(), max_loops=self.max_loops,
            exit_threshold=default_exit_threshold if self.exit_threshold is None else self.exit_threshold,
            exit_mode=self.exit_mode or "confidence", **({} if self.draft_tokens is None else {"draft_tokens": self.draft_tokens}),
            **self.logprob_fields(),
        )


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=0)  # 0 only with echo (score the prompt)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: None = None

    def max_new_tokens(self) -> int:
        return self.max_tokens

    def logprob_fields(self) -> dict:
        # echo scores the prompt at full depth (lm-eval's loglikelihood: echo + logprobs + max_tokens 1)
        scored = self.echo and (self.logprobs is not None or self.max_tokens == 0)
        return {"logprobs": self.logprobs, "prompt_logprobs": (self.logprobs or 0) if scored else None}

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt: must not be empty")
        if isinstance(p[0], int):
            return [p]
        return list(p)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False  # not part of the chat API: refused rather than silently ignored

    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def logprob_fields(self) -> dict:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}


class APIError(Exception):
    """An error the client caused or must handle: an HTTP status and an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_UNION_FIELDS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
}


def validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 that names the parameter."""
    first = err.errors()[0]
    loc = first["loc"]
    if loc and loc[0] in _UNION_FIELDS and first["type"] != "missing":  # loc names the union member tried last
        return APIError(400, f"{loc[0]}: {_UNION_FIELDS[loc[0]]}", param=str(loc[0]))
    param = ".".join(str(part) for part in loc) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first["type"] in ("literal_error", "none_required") and param in ("n", "echo", "logprobs", "suffix", "presence_penalty", "frequency_penalty"):
        message = f"{param}: only the default value is supported by this server ({first['msg']})"
    return APIError(400, message, param=param)


def unencodable_field(data: object, path: str = "") -> tuple[str, str] | None:
    """(path, problem) of the first string (or key) in a parsed JSON body that is not valid Unicode text.

    JSON allows escapes such as "\\ud800" that decode to a lone surrogate: Python holds it, but no
    tokenizer (or UTF-8 encoder) can, so it is the request's fault, reported with the field's path.
    """
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as err:
            return path, f"holds {data[err.start]!r} at character {err.start}, a lone surrogate that is not valid Unicode text"
        return None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        found = unencodable_field(key, where) if isinstance(key, str) else None
        found = found or unencodable_field(value, where)
        if found:
            return found
    return None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, choices: list[dict], usage_: dict | None, chat: bool, chunk: bool = False) -> dict:
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def choice(
    index: int, text: str, finish_reason: str | None, exit_loops: list[int], chat: bool, delta: bool = False,
    logprobs: dict | None = None, extra: dict | None = None,
) -> dict:
    extra = extra or {}
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, "exit_loops": exit_loops, **extra}
    key = "delta" if delta else "message"
    content = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": index, key: content, "logprobs": logprobs, "finish_reason": finish_reason, "exit_loops": exit_loops, **extra}


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[float | None], tops: list[dict | None], offset: int = 0) -> dict:
    """The legacy completions format: tokens, token_logprobs, top_logprobs ({token: logprob} per token,
    None where a token has no score: the first prompt token), text_offset (into the choice's text)."""
    tokens = [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in token_ids]
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    top = [None if d is None else {(tokenizer.decode([t]) if tokenizer is not None else str(t)): lp for t, lp in d.items()} for d in tops]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float], tops: list[dict]) -> dict:
    """The chat format: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token_id: int, lp: float) -> dict:
        token = tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top.items()]} for t, lp, top in zip(token_ids, logprobs, tops)]}
