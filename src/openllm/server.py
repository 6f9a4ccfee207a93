"""An OpenAI-compatible HTTP server for the exported models (``openllm serve``).

Any OpenAI client can list the models and ask for completions::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="step-2400", prompt="ROMEO:", max_tokens=32)

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}`` and
``POST /v1/completions`` (one JSON answer, or server-sent events with ``"stream": true``).
Each model is an :class:`openllm.runtime.OnnxGenerator`, so it writes what ``openllm generate``
writes with the same settings.

Choices worth knowing:

- A request is checked before any work, cheapest first: content type, body size (the
  Content-Length header, then the bytes actually read), UTF-8, JSON (NaN and Infinity are
  refused: they are not JSON), the fields (:class:`CompletionRequest`: strict types, unknown
  fields refused, as OpenAI does), then the limits of params.yaml's ``serve`` section. Every
  error has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; an invalid
  request gets 400 with the field in ``param``.
- Generation is CPU-bound, so it runs in worker threads and the event loop keeps answering
  (``/health`` works during a long generation). At most ``serve.max_concurrent`` generations
  run at once; one more is answered 429 at once instead of waiting in a queue.
- A generation stops when its client disconnects, or when ``serve.request_timeout_seconds`` is
  up: that request gets 504 (code ``generation_timeout``), or, once a stream has begun, an
  error event, which the ``openai`` package raises as ``openai.APIError``.
- No CORS headers (web pages of other sites cannot call it), no authentication, and it listens
  on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncGenerator, Callable, Iterator, Mapping, Sequence

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from .config import EXPORT_DIR, ServeConfig
from .runtime import CONFIG_FILE, REGISTRY_PREFIX, GenerationError, GenerationResult, ModelLoadError, OnnxGenerator
from .sampling import Sampling

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOP = 4  # stop strings per request, OpenAI's limit
DONE = "data: [DONE]\n\n"  # the last server-sent event of a stream


# --- models ----------------------------------------------------------------------------


def model_id(spec: str) -> str:
    """The id clients use for a model: the folder name (``step-2400``) or the registry URI."""
    return spec if spec.startswith(REGISTRY_PREFIX) else Path(spec).name


def find_exports(export_dir: Path = EXPORT_DIR) -> list[Path]:
    """Every export folder below ``export_dir``, in step order (step-800 before step-1600, unlike a name sort)."""

    def order(folder: Path) -> tuple[int, str]:
        step = folder.name.removeprefix("step-")
        return (int(step) if step.isdigit() else -1, folder.name)

    return sorted((p for p in export_dir.glob("*") if (p / CONFIG_FILE).is_file()), key=order)


def load_models(
    specs: Sequence[str] = (), export_dir: Path = EXPORT_DIR, quantized: bool = False
) -> dict[str, OnnxGenerator]:
    """Model id -> generator for each folder or ``models:/`` URI (default: every export)."""
    specs = list(specs) or [str(folder) for folder in find_exports(export_dir)]
    if not specs:
        raise ModelLoadError(
            f"{export_dir}: no exported model to serve (run `openllm export --step N`), or name one with --model"
        )
    models: dict[str, OnnxGenerator] = {}
    for spec in specs:
        name = model_id(spec)
        if name in models:
            raise ModelLoadError(f"two models would both be called {name!r}: serve folders with different names")
        models[name] = OnnxGenerator.load(spec, quantized=quantized)
    return models


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


def _short_repr(value: Any, limit: int = 60) -> str:
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
            messages.append(f"{path}={_short_repr(error.get('input'))}: {error['msg'].removeprefix('Value error, ')}")
    loc = exc.errors()[0]["loc"]
    return APIError(400, "; ".join(messages), param=str(loc[0]) if loc else None)


# --- the request -----------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # one more chunk at the end, with usage and no choices


# OpenAI fields this server has no use for: accepted at their neutral value only, because
# anything else (echo=true, logprobs=5, ...) would be silently wrong.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
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
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)  # an extension: 0 = off
    n: int = Field(1, ge=1)
    stop: list[str] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored: there are no accounts
    echo: bool = False
    logprobs: int | None = None
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

    @field_validator(*NEUTRAL)
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in NEUTRAL[info.field_name]:
            raise ValueError("is not supported by this server (leave it out)")
        return value


@dataclass
class Job:
    """The checked work of one request: one entry of ``prompts`` per choice."""

    generator: OnnxGenerator
    prompts: list[str]  # prompt i of the request, n times, then prompt i + 1 ...
    n: int
    sampling: Sampling
    stop: list[str]
    timeout: float  # seconds allowed (serve.request_timeout_seconds)
    deadline: float  # time.monotonic() after which generation stops

    def choice(self, index: int) -> tuple[Iterator[str], list[GenerationResult]]:
        """The text pieces of one choice, and the list that receives its result at the end."""
        # Choice i is sampled with seed + i, as the prompts of a batch are in the runtime.
        seed = None if self.sampling.seed is None else self.sampling.seed + index
        results: list[GenerationResult] = []
        pieces = self.generator.stream(self.prompts[index], replace(self.sampling, seed=seed), self.stop, results)
        return pieces, results


def plan(body: CompletionRequest, generator: OnnxGenerator, limits: ServeConfig) -> Job:
    """Check the limits that depend on the server and the model; raise 400 :class:`APIError`."""
    if body.n > limits.max_n:
        raise APIError(400, f"n={body.n}: at most {limits.max_n} completions per prompt (serve.max_n)", "n")
    if len(body.prompt) > limits.max_prompts:
        raise APIError(400, f"{len(body.prompt)} prompts: at most {limits.max_prompts} per request "
                            "(serve.max_prompts)", "prompt")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    most = min(limits.max_tokens, generator.context_length - 1)
    if max_tokens > most:
        raise APIError(400, f"max_tokens={max_tokens}: at most {most} (serve.max_tokens={limits.max_tokens}; "
                            f"the model's context is {generator.context_length} tokens)", "max_tokens")
    for prompt in body.prompt:
        count = len(generator.encode(prompt))
        if count > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {count} tokens long: at most {limits.max_prompt_tokens} "
                                "(serve.max_prompt_tokens)", "prompt")
        if count == 0:
            raise APIError(400, f"the prompt {_short_repr(prompt)} has no tokens", "prompt")
    try:
        sampling = generator.sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                      max_new_tokens=max_tokens)
    except GenerationError as exc:
        raise APIError(400, str(exc)) from None
    return Job(
        generator=generator,
        prompts=[prompt for prompt in body.prompt for _ in range(body.n)],
        n=body.n,
        sampling=replace(sampling, seed=body.seed),  # no seed: a random one, as OpenAI does
        stop=body.stop or [],
        timeout=limits.request_timeout_seconds,
        deadline=time.monotonic() + limits.request_timeout_seconds,
    )


async def read_request(request: Request, max_bytes: int) -> CompletionRequest:
    """The validated body, or a 4xx :class:`APIError` that says what is wrong with it."""
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
        async for chunk in request.stream():  # the header may be absent (chunked) or wrong
            data += chunk
            if len(data) > max_bytes:
                raise too_large
    except ClientDisconnect:
        raise ClientGone() from None
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
    try:
        return CompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# --- generation ------------------------------------------------------------------------


class Slots:
    """At most ``size`` generations at once; :meth:`take` never waits."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = threading.BoundedSemaphore(size)
        self.busy = 0

    def take(self) -> Callable[[], None]:
        """Reserve a slot and return the function that frees it; 429 if none is free."""
        if not self._free.acquire(blocking=False):
            raise APIError(
                429, f"the server is busy: {self.size} generations are running (serve.max_concurrent); retry shortly",
                code="too_many_concurrent_requests", kind="rate_limit_error", headers={"retry-after": "1"},
            )
        self.busy += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.busy -= 1
                self._free.release()

        return release


def run_choices(job: Job, cancelled: threading.Event) -> list[GenerationResult]:
    """Generate every choice of ``job`` (in a worker thread), checking between text pieces
    whether the client has gone or the time is up."""
    out: list[GenerationResult] = []
    for index in range(len(job.prompts)):
        pieces, results = job.choice(index)
        for _ in pieces:
            if cancelled.is_set():
                raise ClientGone()
            if time.monotonic() > job.deadline:
                raise timeout_error(job.timeout)
        out.extend(results)
    return out


async def generate(request: Request, job: Job) -> list[GenerationResult]:
    """:func:`run_choices` in a worker thread, stopped if the client disconnects meanwhile."""
    cancelled = threading.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        cancelled.set()

    watcher = asyncio.create_task(watch())
    try:
        return await anyio.to_thread.run_sync(run_choices, job, cancelled)
    finally:
        watcher.cancel()


def _event(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


def _usage(results: Sequence[GenerationResult], n: int) -> dict[str, int]:
    # A prompt is read once however many completions it gets, so it is counted once.
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


async def stream_events(
    request: Request, job: Job, head: dict[str, Any], include_usage: bool
) -> AsyncGenerator[str, None]:
    """The server-sent events of a streamed completion: the choices one after the other.

    Each piece is pulled from the runtime's stream in a worker thread, so the event loop stays
    free between pieces; the stream stops when the client goes or the time is up.
    """
    results: list[GenerationResult] = []
    for index in range(len(job.prompts)):
        pieces, result = job.choice(index)
        try:
            while True:
                if time.monotonic() > job.deadline:
                    yield _event(timeout_error(job.timeout).body())
                    yield DONE
                    return
                piece = await anyio.to_thread.run_sync(next, pieces, None)
                if piece is None:
                    break
                if await request.is_disconnected():
                    return  # nobody is reading: stop generating
                yield _event({**head, "choices": [_choice(index, piece, None)]})
        except GenerationError as exc:  # should not happen: plan() checked the request
            yield _event(APIError(400, str(exc)).body())
            yield DONE
            return
        finally:
            pieces.close()
        results += result
        yield _event({**head, "choices": [_choice(index, "", result[0].finish_reason)]})
    if include_usage:
        yield _event({**head, "choices": [], "usage": _usage(results, job.n)})
    yield DONE


class SlotStreamingResponse(StreamingResponse):
    """A streamed response that frees its generation slot when it ends, however it ends
    (finished, client gone, server stopping), and only once no worker thread is running."""

    def __init__(self, content: AsyncGenerator[str, None], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # closes the runtime's stream if it was left open
            self.release()


# --- the application -------------------------------------------------------------------


def create_app(models: Mapping[str, OnnxGenerator], limits: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``models`` (id -> generator) within ``limits``."""
    limits = limits or ServeConfig()
    slots = Slots(limits.max_concurrent)
    loaded_at = int(time.time())
    # No /docs or /openapi.json: the API is OpenAI's, documented there and in the README.
    app = FastAPI(title="OpenLLM", docs_url=None, redoc_url=None, openapi_url=None)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": loaded_at, "owned_by": "openllm"}

    def find_model(name: str) -> OnnxGenerator:
        if name not in models:
            raise APIError(404, f"the model {name!r} does not exist; this server has {', '.join(models)}",
                           param="model", code="model_not_found")
        return models[name]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(models), "generations": slots.busy, "max_concurrent": slots.size}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in models]}

    @app.get("/v1/models/{name:path}")  # registry ids contain slashes
    async def get_model(name: str) -> dict[str, Any]:
        find_model(name)
        return model_card(name)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_request(request, limits.max_body_bytes)
        job = plan(body, find_model(body.model), limits)
        release = slots.take()
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return SlotStreamingResponse(stream_events(request, job, head, include_usage), release)
        try:
            results = await generate(request, job)
        finally:
            release()
        choices = [_choice(i, r.text, r.finish_reason) for i, r in enumerate(results)]
        return JSONResponse({**head, "choices": choices, "usage": _usage(results, job.n)})

    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody will read it


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own errors (unknown path, wrong method), in OpenAI's shape.
    assert isinstance(exc, HTTPException)
    headers = exc.headers or {}
    if exc.status_code == 404:
        message = f"unknown endpoint {request.method} {request.url.path} (see GET /v1/models, POST /v1/completions)"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {headers.get('Allow', '?')})"
    else:
        message = str(exc.detail)
    return APIError(exc.status_code, message, headers=headers).response()


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return APIError(500, f"internal server error ({type(exc).__name__})", kind="server_error").response()


def serve(specs: Sequence[str], limits: ServeConfig, quantized: bool = False) -> None:
    """Load the models and serve them until interrupted (``openllm serve``)."""
    import uvicorn  # only here: the library does not need it

    models = load_models(specs, quantized=quantized)
    for name, generator in models.items():
        log.info("serving %s (%s, context %d tokens)", name, generator.source, generator.context_length)
    if limits.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the server (no authentication)",
                    limits.host)
    uvicorn.run(create_app(models, limits), host=limits.host, port=limits.port, log_level="info")
