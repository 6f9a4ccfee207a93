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

- Requests are checked before any work (:mod:`openllm.api`, then
  :func:`openllm.completions.plan` against the limits of params.yaml's ``serve`` section and
  the model's context); a prompt that does not fit in the context with ``max_tokens`` is
  refused, never silently cut. :mod:`openllm.server_ops` holds the metrics, the lineage and the
  HTTP-layer limits.
- Waiting requests queue up to ``serve.max_queued``; one more is answered 429 at once. A
  request stops when its client disconnects, or when ``serve.request_timeout_seconds`` is up
  (504, or an error event once a stream has begun).
- With an API key in the environment variable ``serve.api_key_env``, the ``/v1`` endpoints
  need ``Authorization: Bearer <key>``; a host beyond loopback needs a key unless
  ``serve.allow_unauthenticated``. No CORS headers: web pages of other sites cannot call it.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from .api import APIError, ClientGone, read_request
from .batching import Scheduler
from .completions import complete, plan
from .config import ServeConfig
from .decode import blocked_pattern
from .paths import EXPORT_DIR, parse_step
from .errors import OpenLLMError
from .runtime import CONFIG_FILE, REGISTRY_PREFIX, ModelLoadError, OnnxGenerator
from .server_ops import Metrics, lineage, open_files_for

log = logging.getLogger(__name__)

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
        step = parse_step(folder.name)
        return (-1 if step is None else step, folder.name)

    folders = (p for p in export_dir.glob("*") if not p.name.startswith(".") and (p / CONFIG_FILE).is_file())
    return sorted(folders, key=order)


def load_models(
    specs: Sequence[str] = (), export_dir: Path = EXPORT_DIR, quantized: bool = False, engine: str = "onnxruntime",
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
        # worker threads sleep between model calls: the HTTP threads need the same cores
        models[name] = OnnxGenerator.load(spec, quantized=quantized, spinning=False, engine=engine)
    return models


# --- the application -------------------------------------------------------------------


def create_app(models: Mapping[str, OnnxGenerator], limits: ServeConfig | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``models`` (id -> generator) within ``limits``.

    ``api_key``: the bearer token the ``/v1`` endpoints require (None or empty: none).
    """
    limits = limits or ServeConfig()
    schedulers = {name: Scheduler(generator, limits.batch_size, limits.max_queued) for name, generator in models.items()}
    metrics = Metrics(schedulers)
    blocked = blocked_pattern(limits.output_filter)
    authorize = bearer_check(api_key, limits.api_key_env)
    loaded_at = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for scheduler in schedulers.values():
            scheduler.close()

    # No /docs or /openapi.json: the API is OpenAI's, documented there and in the README.
    app = FastAPI(title="OpenLLM", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

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
        return {**model_card(name), "lineage": lineage(find_model(models, name))}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = await read_request(request, limits.max_body_bytes, limits.client_timeout_seconds)
        job = plan(body, find_model(models, body.model), limits, blocked)
        return await complete(request, body, job, schedulers[body.model], metrics)

    metrics.install(app)
    for kind, handler in ((APIError, _api_error), (ClientGone, _client_gone), (HTTPException, _http_error),
                          (Exception, _unexpected_error)):
        app.add_exception_handler(kind, handler)
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


def find_model(models: Mapping[str, OnnxGenerator], name: str) -> OnnxGenerator:
    if name not in models:
        raise APIError(404, f"the model {name!r} does not exist; this server has {', '.join(models)}",
                       param="model", code="model_not_found")
    return models[name]


def bearer_check(api_key: str | None, variable: str) -> Callable[[Request], None]:
    """A check that raises 401 unless the request carries ``Authorization: Bearer <api_key>``."""

    def authorize(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "a missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                f"with the key the server reads from ${variable}",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"})

    return authorize


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

    from .server_ops import BACKLOG, SlowClientProtocol

    class Protocol(SlowClientProtocol):
        header_timeout = limits.client_timeout_seconds
        max_connections = limits.max_connections

    return uvicorn.Config(
        app, host=limits.host, port=limits.port, http=Protocol, limit_concurrency=limits.max_connections,
        backlog=BACKLOG,
        timeout_keep_alive=max(1, round(limits.client_timeout_seconds)),
        h11_max_incomplete_event_size=limits.max_header_bytes, **options,
    )


def serve(specs: Sequence[str], limits: ServeConfig, quantized: bool = False) -> None:
    """Load the models and serve them until interrupted (``openllm serve``)."""
    import uvicorn

    api_key = api_key_for(limits)
    open_files_for(limits.max_connections)
    models = load_models(specs, quantized=quantized, engine=limits.engine)
    for name, generator in models.items():
        log.info("serving %s (%s, context %d tokens)", name, generator.source, generator.context_length)
    if api_key is None and limits.host not in LOOPBACK:
        log.warning("listening on %s without an API key: anyone who can reach this machine can use it", limits.host)
    uvicorn.Server(uvicorn_config(create_app(models, limits, api_key), limits, log_level="info")).run()
