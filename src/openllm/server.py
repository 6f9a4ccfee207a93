"""An OpenAI-compatible HTTP server for the exported models (``openllm serve``).

Any OpenAI client can list the models and ask for completions::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="step-2400", prompt="ROMEO:", max_tokens=32)

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``,
``GET /v1/models/{id}`` (with the model's lineage) and ``POST /v1/completions`` (one JSON
answer, or server-sent events with ``"stream": true``). Each model is an
:class:`openllm.runtime.OnnxGenerator` run by a :class:`openllm.batching.Scheduler`, so
concurrent requests share decode steps and a seed gives what ``openllm generate`` writes.

Choices worth knowing:

- Requests are checked before any work (:mod:`openllm.api`, then :func:`plan` against the
  limits of params.yaml's ``serve`` section and the model's context); a prompt that does not
  fit in the context with ``max_tokens`` is refused, never silently cut.
- Waiting requests queue up to ``serve.max_queued``; one more is answered 429 at once. A
  request stops when its client disconnects, or when ``serve.request_timeout_seconds`` is up
  (504, or an error event once a stream has begun).
- With an API key in the environment variable ``serve.api_key_env``, the ``/v1`` endpoints
  need ``Authorization: Bearer <key>``; a host beyond loopback needs a key unless
  ``serve.allow_unauthenticated``. No CORS headers: web pages of other sites cannot call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .api import APIError, ClientGone, CompletionRequest, read_request, short_repr, timeout_error
from .batching import QueueFull, Scheduler, Ticket
from .config import EXPORT_DIR, ServeConfig
from .decode import Row, log_softmax
from .errors import OpenLLMError
from .runtime import CONFIG_FILE, REGISTRY_PREFIX, GenerationError, ModelLoadError, OnnxGenerator
from .server_ops import Metrics, lineage

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
DONE = "data: [DONE]\n\n"  # the last server-sent event of a stream
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --- models ----------------------------------------------------------------------------


def model_id(spec: str) -> str:
    """The id clients use for a model: the folder name (``step-2400``) or the registry URI."""
    return spec if spec.startswith(REGISTRY_PREFIX) else Path(spec).name


def find_exports(export_dir: Path = EXPORT_DIR) -> list[Path]:
    """Every finished export folder below ``export_dir``, in step order (step-800 before step-1600).

    Hidden folders are skipped: an export being written (or killed midway) lives in
    ``.step-N.tmp-*`` and has not passed the check against PyTorch.
    """

    def order(folder: Path) -> tuple[int, str]:
        step = folder.name.removeprefix("step-")
        return (int(step) if step.isdigit() else -1, folder.name)

    folders = (p for p in export_dir.glob("*") if not p.name.startswith(".") and (p / CONFIG_FILE).is_file())
    return sorted(folders, key=order)


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


# --- checking a request against the model and the limits --------------------------------


@dataclass
class Job:
    """The checked work of one request: one row per choice (prompt i's n choices, then prompt i + 1's)."""

    model: str
    generator: OnnxGenerator
    prompts: list[list[int]]  # token ids of each prompt
    prompt_texts: list[str]
    rows: list[Row]  # empty when max_tokens is 0 (echo only)
    n: int
    echo: bool
    logprobs: int | None
    timeout: float

    def prompt_of(self, choice: int) -> int:
        return choice // self.n


def plan(body: CompletionRequest, generator: OnnxGenerator, limits: ServeConfig,
         blocked: re.Pattern[str] | None) -> Job:
    """Check the limits that depend on the server and the model; raise 400 :class:`APIError`."""
    if body.n > limits.max_n:
        raise APIError(400, f"n={body.n}: at most {limits.max_n} completions per prompt (serve.max_n)", "n")
    if len(body.prompt) > limits.max_prompts:
        raise APIError(400, f"{len(body.prompt)} prompts: at most {limits.max_prompts} per request "
                            "(serve.max_prompts)", "prompt")
    if body.stream and (body.echo or body.logprobs is not None):
        raise APIError(400, "echo and logprobs are not supported with stream=true", "stream")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    context = generator.context_length
    most = min(limits.max_tokens, context - 1)
    if max_tokens > most:
        raise APIError(400, f"max_tokens={max_tokens}: at most {most} (serve.max_tokens={limits.max_tokens}; "
                            f"the model's context is {context} tokens)", "max_tokens")
    prompts = [generator.encode(prompt) for prompt in body.prompt]
    for text, ids in zip(body.prompt, prompts):
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens long: at most {limits.max_prompt_tokens} "
                                "(serve.max_prompt_tokens)", "prompt")
        if not ids:
            raise APIError(400, f"the prompt {short_repr(text)} has no tokens", "prompt")
        if len(ids) + max(max_tokens, 1) > context:  # refused rather than cut: a cut prompt changes the answer
            raise APIError(400, f"the model's context is {context} tokens, but {len(ids)} in the prompt + "
                                f"{max_tokens} max_tokens ask for {len(ids) + max_tokens}: shorten the prompt "
                                "or lower max_tokens", "prompt", code="context_length_exceeded")
    rows = []
    if max_tokens > 0:
        try:
            sampling = generator.sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                          max_new_tokens=max_tokens)
        except GenerationError as exc:
            raise APIError(400, str(exc)) from None
        for choice in range(len(prompts) * body.n):  # choice i draws with seed + i; no seed: a random one each
            seed = None if body.seed is None else body.seed + choice
            rows.append(generator.new_row(prompts[choice // body.n], replace(sampling, seed=seed), body.stop or [],
                                          blocked, body.logprobs))
    return Job(model=body.model, generator=generator, prompts=prompts, prompt_texts=body.prompt, rows=rows,
               n=body.n, echo=body.echo, logprobs=body.logprobs, timeout=limits.request_timeout_seconds)


# --- answers ---------------------------------------------------------------------------


def _usage(job: Job) -> dict[str, int]:
    # A prompt is read once however many completions it gets, so it is counted once.
    prompt = sum(len(ids) for ids in job.prompts)
    completion = sum(len(row.tokens) for row in job.rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def _event(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


def prompt_logprobs(generator: OnnxGenerator, ids: list[int], top: int) -> list[tuple[int, float | None, list]]:
    """(token, log-probability given the tokens before it, top alternatives) for each prompt token."""
    tokens = np.asarray([ids], np.int64)
    logits, _ = generator.forward(tokens, np.ones_like(tokens), np.arange(len(ids))[None], None)
    logprobs = log_softmax(logits[0, :-1])  # position t predicts token t + 1
    out: list[tuple[int, float | None, list]] = [(ids[0], None, [])]
    for t in range(1, len(ids)):
        row = logprobs[t - 1]
        best = np.argsort(-row, kind="stable")[:top]
        out.append((ids[t], float(row[ids[t]]), [(int(k), float(row[k])) for k in best]))
    return out


def _logprobs_field(generator: OnnxGenerator, entries: list[tuple[int, float | None, list]]) -> dict[str, Any]:
    """OpenAI's completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [generator.token_text(token) for token, _, _ in entries]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = [None if lp is None else {generator.token_text(k): v for k, v in top} for _, lp, top in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


async def _answer(job: Job) -> list[dict[str, Any]]:
    """The choices of a finished non-streamed job (prompt log-probabilities computed here)."""
    choices = []
    rows = job.rows or [None] * (len(job.prompts) * job.n)
    for index, row in enumerate(rows):
        prompt = job.prompt_of(index)
        text = row.text.text if row else ""
        entries: list = []
        if job.echo:
            text = job.prompt_texts[prompt] + text
            if job.logprobs is not None:
                entries = await anyio.to_thread.run_sync(prompt_logprobs, job.generator, job.prompts[prompt],
                                                         job.logprobs)
        if row and job.logprobs is not None:
            entries += [(e.token, e.logprob, e.top) for e in row.logprobs[: len(row.tokens)]]
        logprobs = _logprobs_field(job.generator, entries) if job.logprobs is not None else None
        choices.append(_choice(index, text, row.finish if row else "length", logprobs))
    return choices


async def run_ticket(request: Request, scheduler: Scheduler, job: Job) -> Ticket:
    """Queue the job's rows and wait for them, cancelling them if the client disconnects."""
    ticket = submit(scheduler, job)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        ticket.cancel()

    watcher = asyncio.create_task(watch())
    try:
        while (event := await ticket.events.get())[0] != "done":
            pass
    finally:
        watcher.cancel()
        ticket.cancel()
    _raise_for(ticket.outcome, job)
    return ticket


def submit(scheduler: Scheduler, job: Job, stream: bool = False) -> Ticket:
    ticket = Ticket(job.rows, time.monotonic() + job.timeout, asyncio.get_running_loop(), stream)
    try:
        scheduler.submit(ticket)
    except QueueFull:
        raise APIError(
            429, f"the server is busy: {scheduler.max_queued} requests are already waiting for {job.model} "
            "(serve.max_queued); retry shortly", code="queue_full", kind="rate_limit_error",
            headers={"retry-after": "1"},
        ) from None
    return ticket


def _raise_for(outcome: str | None, job: Job) -> None:
    if outcome == "timeout":
        raise timeout_error(job.timeout)
    if outcome == "cancelled":
        raise ClientGone()
    if outcome == "error":
        raise APIError(500, "the generation failed (see the server log)", kind="server_error")


async def stream_events(request: Request, scheduler: Scheduler, job: Job, head: dict[str, Any],
                        include_usage: bool, metrics: Metrics) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion: pieces of all choices as they come."""
    started = time.perf_counter()
    ticket = submit(scheduler, job, stream=True)
    try:
        while True:
            kind, value, piece = await ticket.events.get()
            if await request.is_disconnected():
                return  # nobody is reading: the finally clause stops the generation
            if kind == "piece":
                yield _event({**head, "choices": [_choice(value, piece, None)]})
            elif kind == "end":
                yield _event({**head, "choices": [_choice(value, "", job.rows[value].finish)]})
            else:
                break
        if ticket.outcome == "ok":
            metrics.observe(job, time.perf_counter() - started)
            if include_usage:
                yield _event({**head, "choices": [], "usage": _usage(job)})
        elif ticket.outcome == "timeout":
            yield _event(timeout_error(job.timeout).body())
        elif ticket.outcome == "error":
            yield _event(APIError(500, "the generation failed", kind="server_error").body())
        yield DONE
    finally:
        ticket.cancel()


class TicketStreamingResponse(StreamingResponse):
    """A streamed response that stops its generation when it ends, however it ends."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # runs stream_events' finally: the ticket is cancelled


# --- the application -------------------------------------------------------------------


def create_app(models: Mapping[str, OnnxGenerator], limits: ServeConfig | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``models`` (id -> generator) within ``limits``.

    ``api_key``: the bearer token the ``/v1`` endpoints require (None or empty: none).
    """
    limits = limits or ServeConfig()
    schedulers = {name: Scheduler(generator, limits.batch_size, limits.max_queued) for name, generator in models.items()}
    metrics = Metrics(schedulers)
    blocked = re.compile("|".join(f"(?:{p})" for p in limits.output_filter), re.IGNORECASE) if limits.output_filter else None
    loaded_at = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for scheduler in schedulers.values():
            scheduler.close()

    # No /docs or /openapi.json: the API is OpenAI's, documented there and in the README.
    app = FastAPI(title="OpenLLM", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def authorize(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "a missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                f"with the key the server reads from ${limits.api_key_env}",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"})

    def find_model(name: str) -> OnnxGenerator:
        if name not in models:
            raise APIError(404, f"the model {name!r} does not exist; this server has {', '.join(models)}",
                           param="model", code="model_not_found")
        return models[name]

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": loaded_at, "owned_by": "openllm"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(models), "generations": sum(s.running for s in schedulers.values()),
                "queued": sum(s.queued for s in schedulers.values()), "batch_size": limits.batch_size,
                "max_queued": limits.max_queued}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card(name) for name in models]}

    @app.get("/v1/models/{name:path}")  # registry ids contain slashes
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        return {**model_card(name), "lineage": lineage(find_model(name))}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = await read_request(request, limits.max_body_bytes, limits.client_timeout_seconds)
        job = plan(body, find_model(body.model), limits, blocked)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = stream_events(request, schedulers[body.model], job, head, include_usage, metrics)
            first = await anext(events)  # a full queue is a 429 here, before the stream begins
            return TicketStreamingResponse(_prepend(first, events))
        started = time.perf_counter()
        if job.rows:
            await run_ticket(request, schedulers[body.model], job)
        choices = await _answer(job)
        metrics.observe(job, time.perf_counter() - started)
        return JSONResponse({**head, "choices": choices, "usage": _usage(job)})

    metrics.install(app)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


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


def api_key_for(limits: ServeConfig) -> str | None:
    """The API key from ``$serve.api_key_env``; refuses to expose a server without one unless waived."""
    key = os.environ.get(limits.api_key_env) or None
    if key is None and limits.host not in LOOPBACK and not limits.allow_unauthenticated:
        raise OpenLLMError(
            f"serve.host={limits.host} lets other machines in, but ${limits.api_key_env} (serve.api_key_env) holds "
            "no API key: set one, or set serve.allow_unauthenticated: true to serve without authentication"
        )
    return key


def uvicorn_config(app: FastAPI, limits: ServeConfig, **options: Any) -> Any:
    """uvicorn's settings with the HTTP-layer limits of ``limits`` (see the README's table)."""
    import uvicorn  # only here: the library does not need it

    from .server_ops import SlowClientProtocol

    class Protocol(SlowClientProtocol):
        header_timeout = limits.client_timeout_seconds

    return uvicorn.Config(
        app, host=limits.host, port=limits.port, http=Protocol, limit_concurrency=limits.max_connections,
        timeout_keep_alive=max(1, round(limits.client_timeout_seconds)),
        h11_max_incomplete_event_size=limits.max_header_bytes, **options,
    )


def serve(specs: Sequence[str], limits: ServeConfig, quantized: bool = False) -> None:
    """Load the models and serve them until interrupted (``openllm serve``)."""
    import uvicorn

    api_key = api_key_for(limits)
    models = load_models(specs, quantized=quantized)
    for name, generator in models.items():
        log.info("serving %s (%s, context %d tokens)", name, generator.source, generator.context_length)
    if api_key is None and limits.host not in LOOPBACK:
        log.warning("listening on %s without an API key: anyone who can reach this machine can use it", limits.host)
    uvicorn.Server(uvicorn_config(create_app(models, limits, api_key), limits, log_level="info")).run()
