"""The work of ``POST /v1/completions``: check a request against the model and the limits
(:func:`plan`), run its rows through the model's :class:`openllm.batching.Scheduler`, and answer
in OpenAI's shape, as one JSON object or as server-sent events (:func:`complete`)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import anyio
import numpy as np
import regex
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .api import APIError, ClientGone, CompletionRequest, short_repr, timeout_error
from .batching import QueueFull, Scheduler, Ticket
from .config import ServeConfig
from .decode import Row, log_softmax
from .runtime import GenerationError, OnnxGenerator
from .server_ops import Metrics

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
DONE = "data: [DONE]\n\n"  # the last server-sent event of a stream


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
         blocked: regex.Pattern[str] | None) -> Job:
    """Check the limits that depend on the server and the model; raise 400 :class:`APIError`."""
    if body.n > limits.max_n:
        raise APIError(400, f"n={body.n}: at most {limits.max_n} completions per prompt (serve.max_n)", "n")
    if len(body.prompt) > limits.max_prompts:
        raise APIError(400, f"{len(body.prompt)} prompts: at most {limits.max_prompts} per request "
                            "(serve.max_prompts)", "prompt")
    if body.stream and (body.echo or body.logprobs is not None):
        raise APIError(400, "echo and logprobs are not supported with stream=true", "stream")
    if body.logprobs is not None and generator.engine != "onnxruntime":
        raise APIError(400, f"logprobs are not available with serve.engine={generator.engine} "
                            "(the onnxruntime engine has them)", "logprobs")
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
            rows.append(generator.new_row(prompts[choice // body.n], sampling.replace(seed=seed), body.stop or [],
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
        while (await ticket.events.get())[0] != "done":
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


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item



async def complete(request: Request, body: CompletionRequest, job: Job, scheduler: Scheduler,
                   metrics: Metrics) -> Response:
    """Run a planned job: a JSON answer, or a stream of server-sent events."""
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = stream_events(request, scheduler, job, head, include_usage, metrics)
        first = await anext(events)  # a full queue is a 429 here, before the stream begins
        return TicketStreamingResponse(_prepend(first, events))
    started = time.perf_counter()
    if job.rows:
        await run_ticket(request, scheduler, job)
    choices = await _answer(job)
    metrics.observe(job, time.perf_counter() - started)
    return JSONResponse({**head, "choices": choices, "usage": _usage(job)})
