"""What the server's operators see and set: Prometheus metrics, model lineage, HTTP-layer limits.

``GET /metrics`` answers in Prometheus's text format (one registry per application):

- ``openllm_http_requests_total{endpoint, status}``: answered requests;
- ``openllm_prompt_tokens_total{model}``, ``openllm_generation_tokens_total{model}``;
- ``openllm_time_to_first_token_seconds{model}`` and ``openllm_request_latency_seconds{model}``
  (histograms; the wait in the queue included);
- ``openllm_queue_depth{model}`` (requests waiting) and ``openllm_running_generations{model}``
  (choices being generated now);
- ``openllm_content_filtered_total{model}``: choices ended by ``serve.output_filter``.
"""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import tracking
from .batching import Scheduler
from .errors import OpenLLMError
from .runtime import OnnxGenerator

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .server import Job

ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions")
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The server's Prometheus metrics (see the module docstring)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, schedulers: Mapping[str, Scheduler]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("openllm_http_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("openllm_prompt_tokens", "prompt tokens read", ["model"], registry=r)
        self.generation_tokens = Counter("openllm_generation_tokens", "tokens generated", ["model"], registry=r)
        self.first_token = Histogram("openllm_time_to_first_token_seconds", "from arrival to the first new token",
                                     ["model"], buckets=SECONDS, registry=r)
        self.latency = Histogram("openllm_request_latency_seconds", "completion requests, from arrival to the end",
                                 ["model"], buckets=SECONDS, registry=r)
        self.filtered = Counter("openllm_content_filtered", "choices ended by serve.output_filter", ["model"],
                                registry=r)
        queue = Gauge("openllm_queue_depth", "requests waiting for a place in the batch", ["model"], registry=r)
        running = Gauge("openllm_running_generations", "choices being generated now", ["model"], registry=r)
        for name, scheduler in schedulers.items():
            queue.labels(name).set_function(lambda s=scheduler: s.queued)
            running.labels(name).set_function(lambda s=scheduler: s.running)
            for family in (self.prompt_tokens, self.generation_tokens, self.filtered):
                family.labels(name)  # present (at 0) from the start

    def observe(self, job: Job, seconds: float) -> None:
        """Count a completed completion request."""
        self.prompt_tokens.labels(job.model).inc(sum(len(ids) for ids in job.prompts))
        self.generation_tokens.labels(job.model).inc(sum(len(row.tokens) for row in job.rows))
        self.latency.labels(job.model).observe(seconds)
        if job.rows:
            self.first_token.labels(job.model).observe(min(row.first_token_seconds for row in job.rows))
        self.filtered.labels(job.model).inc(sum(row.finish == "content_filter" for row in job.rows))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def install(self, app: FastAPI) -> None:
        """Count every answered request by endpoint and status (a plain ASGI middleware)."""
        requests = self.requests

        class CountRequests:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    return await self.inner(scope, receive, send)
                path = scope["path"]
                endpoint = "/v1/models/{id}" if path.startswith("/v1/models/") else (
                    path if path in ENDPOINTS else "other")

                async def counting_send(message: dict) -> None:
                    if message["type"] == "http.response.start":
                        requests.labels(endpoint, str(message["status"])).inc()
                    await send(message)

                await self.inner(scope, receive, counting_send)

        app.add_middleware(CountRequests)


def training_run(source: str) -> str | None:
    """The MLflow run that trained an export folder's checkpoint (models/export/step-N), if known here."""
    path = Path(str(source))  # the model file of an export folder, or a models:/ URI
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        return None  # a models:/ URI: the registry version names its run
    return tracking.read_run_id(folder.parent.parent / "checkpoints")


def lineage(generator: OnnxGenerator) -> dict[str, Any]:
    """Where a served model comes from: code, data, tokenizer, parameters, checkpoint, registry."""
    config = generator.config
    meta = config.get("checkpoint", {}).get("meta", {})
    evaluation = config.get("evaluation") or {}
    return {
        "source": generator.source,
        "code_sha256": meta.get("code_sha256"),  # the training code (git sha: the MLflow run's tags)
        "data_sha256": meta.get("data_sha256"),
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "params_sha256": meta.get("params_sha256"),
        "checkpoint_step": config.get("step", meta.get("step")),
        "val_loss": evaluation.get("val_loss", config.get("val_loss")),
        "val_bits_per_byte": evaluation.get("val_bits_per_byte"),
        "mlflow_run_id": training_run(generator.source),
        "onnx_sha256": config.get("sha256", {}).get(config.get("files", {}).get("model", "")),
        "registry_version": getattr(generator, "registry_version", None),
        "context_length": generator.context_length,
    }


# Connections past serve.max_connections that are still accepted, to be answered 503; beyond
# them a new connection is closed at once. BACKLOG: connections the kernel queues, which the
# event loop accepts in one go; it closes them one loop turn later, while it may accept the
# next BACKLOG. Plus files for models and logs.
OVERFLOW_CONNECTIONS = 64
BACKLOG = 64
OTHER_FILES = 64


def open_files_for(max_connections: int) -> int:
    """Raise this process's soft open-file limit to what ``max_connections`` needs; return the limit.

    Without it, connections beyond the limit make accept() fail with "too many open files",
    and then the server answers nobody (not even /health) and logs each failure.
    """
    need = max_connections + OVERFLOW_CONNECTIONS + 2 * BACKLOG + OTHER_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise OpenLLMError(
            f"serve.max_connections={max_connections} needs {need} open files, but this process may open at "
            f"most {hard} (`ulimit -Hn`): lower serve.max_connections to {max(1, hard - need + max_connections)} "
            "or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


class SlowClientProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing connections that do not send a whole request head
    within ``header_timeout`` seconds (uvicorn waits forever: slow clients could hold every
    connection). The keep-alive timeout covers idle connections between requests. Connections
    beyond ``max_connections`` + OVERFLOW_CONNECTIONS are closed as soon as they are accepted,
    so a flood of them cannot use up the open files."""

    header_timeout = 10.0
    max_connections = 256

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)
        if len(self.server_state.connections) > self.max_connections + OVERFLOW_CONNECTIONS:
            transport.close()

    def _head_too_slow(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete  # no request has begun since
        if idle and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head_timer.cancel()  # the next request's head gets the same time
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)
