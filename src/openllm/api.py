"""The OpenAI-shaped edge of the server: errors, and the checked body of a completion request.

A request is checked before any work, cheapest first: content type, body size (the
Content-Length header, then the bytes actually read, within the client time limit), UTF-8,
JSON (NaN and Infinity are refused: they are not JSON), text (a lone surrogate such as
``"\\ud800"`` is valid JSON but not text), then the fields (:class:`CompletionRequest`: strict
types, unknown fields refused, as OpenAI does). Every error has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; an invalid request gets 400 with the field
in ``param``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.requests import ClientDisconnect

MAX_STOP = 4  # stop strings per request, OpenAI's limit
MAX_LOGPROBS = 5  # alternatives per token in `logprobs`, OpenAI's limit


# --- errors ----------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error", headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected, so its generation was stopped."""


def timeout_error(seconds: float) -> APIError:
    # x-should-retry tells the openai package not to retry: the same request would time out again.
    return APIError(
        504, f"the generation took longer than {seconds:g} s (serve.request_timeout_seconds) and was stopped; "
        "ask for fewer tokens (max_tokens) or fewer completions (n)",
        code="generation_timeout", kind="timeout_error", headers={"x-should-retry": "false"},
    )


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_error(exc: ValidationError) -> APIError:
    """pydantic's errors as one 400 whose ``param`` is the first offending field."""
    messages = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"])
        if error["type"] == "missing":
            messages.append(f"'{path}' is required")
        elif error["type"] == "extra_forbidden":
            messages.append(f"unknown field '{path}' (this server takes: {', '.join(CompletionRequest.model_fields)})")
        else:
            messages.append(f"{path}={short_repr(error.get('input'))}: {error['msg'].removeprefix('Value error, ')}")
    loc = exc.errors()[0]["loc"]
    return APIError(400, "; ".join(messages), param=str(loc[0]) if loc else None)


# --- the request -----------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # one more chunk at the end, with usage and no choices


# OpenAI fields this server has no use for: accepted at their neutral value only, because
# anything else (best_of=3, a penalty, ...) would be silently wrong.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "suffix": (None, ""),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
}


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``: OpenAI's fields, plus ``top_k``.

    Types are strict (``"5"`` is not a number, ``"true"`` not a boolean) and unknown fields are
    refused, as OpenAI does, so that a misspelt ``max_token`` is an error rather than ignored.
    Omitted sampling fields take the model's defaults (from the export: params.yaml
    ``evaluate.sampling``); an omitted ``seed`` means a fresh random one for each request.
    The limits that depend on the server or the model are checked by :func:`plan`.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    prompt: list[str] = Field(min_length=1)  # a single string becomes a list of one
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (score the prompt)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)  # an extension: 0 = off
    n: int = Field(1, ge=1)
    stop: list[str] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored: there are no accounts
    echo: bool = False  # the prompt is repeated before the completion (with its logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # log-probabilities, and this many alternatives
    best_of: int | None = None
    suffix: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("prompt", "stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if value is None and info.field_name == "stop":
            return None
        # Lists of token ids (which OpenAI also takes) are not supported.
        raise ValueError("must be a string or a list of strings")

    @field_validator("prompt", "stop")
    @classmethod
    def _no_empty_strings(cls, value: list[str] | None) -> list[str] | None:
        if value and not all(value):
            raise ValueError("must not contain empty strings")
        return value

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 writes nothing: it is only allowed with echo=true (to score the prompt)")
        return self

    @field_validator(*NEUTRAL)
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in NEUTRAL[info.field_name]:
            raise ValueError("is not supported by this server (leave it out)")
        return value


async def read_request(request: Request, max_bytes: int, seconds: float) -> CompletionRequest:
    """The validated body, or a 4xx :class:`APIError` that says what is wrong with it.

    The body must arrive within ``seconds`` (a client that stalls gets 408).
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got {content_type!r})",
                       code="unsupported_media_type")
    too_large = APIError(413, f"the request body is larger than {max_bytes} bytes (serve.max_body_bytes)",
                         code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:  # refused before reading anything
        raise too_large
    data = bytearray()
    try:
        with anyio.fail_after(seconds):
            async for chunk in request.stream():  # the header may be absent (chunked) or wrong
                data += chunk
                if len(data) > max_bytes:
                    raise too_large
    except ClientDisconnect:
        raise ClientGone() from None
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {seconds:g} s (serve.client_timeout_seconds)",
                       code="request_timeout") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        # Python's json reads NaN and Infinity, which are not JSON (and not numbers one can sample with).
        raw = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno}, "
                            f"column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(raw).__name__}")
    where = _lone_surrogate(raw)
    if where:
        raise APIError(400, f"{where[0]} holds a lone surrogate ({where[1]!r}): it is not text, since UTF-8 "
                            "cannot encode it (send characters outside the BMP as one code point)",
                       param=where[0].split(".")[0].split("[")[0])
    try:
        return CompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")




def _lone_surrogate(value: Any, path: str = "") -> tuple[str, str] | None:
    """(where, the surrogate) of the first string in ``value`` holding a lone surrogate, else None.

    JSON's ``"\\ud800"`` escape decodes to one, which no UTF-8 tokenizer can encode.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path or "the body", value[exc.start]
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key) if isinstance(key, str) else None
        if found:
            return "a field name", found[1]
        where = _lone_surrogate(item, f"{path}.{key}".lstrip(".") if isinstance(key, str) else f"{path}[{key}]")
        if where:
            return where
    return None
