"""Tests for openllm.server (`openllm serve`): the official openai client and raw HTTP, live.

Two kinds of server, both on 127.0.0.1 with a free port:

- ``server``: ``openllm serve`` in a subprocess, started in a folder whose models/export holds
  two exports with different weights (step-10, step-20) and whose params.yaml has small
  limits. Its process id lets the load test read the server's memory.
- ``live(models, **limits)``: uvicorn in a thread of this process (with the HTTP-layer
  settings of ``openllm serve``), often serving a :class:`SlowGenerator` (the tiny model is
  done in milliseconds; this one sleeps in each model call), to test the queue, the time
  limit, clients that disconnect, authentication, metrics and the output filter.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import openai
import psutil
import pytest
import uvicorn

from fixtures_export import build_checkpoint, build_export
from helpers import REPO_ROOT, run_openllm, write_params
from openllm.config import ExportConfig, ServeConfig
from openllm.sampling import Sampling
from openllm.export import export_checkpoint
from openllm.runtime import ModelLoadError, OnnxGenerator
from openllm.decode import log_softmax
from openllm.server import api_key_for, create_app, find_exports, load_models, model_id, uvicorn_config
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(REPO_ROOT / "bench"))
from server_load import free_port, measure, start_server, stop_server, wait_until_healthy  # noqa: E402

LIMITS = dict(max_prompt_tokens=100, max_tokens=64, max_body_bytes=8192, max_n=3, max_prompts=4,
              batch_size=8, max_queued=16, request_timeout_seconds=30)
PROMPT = "ROMEO:\n"
ERROR_KEYS = {"message", "type", "param", "code"}


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(session_dir: Path) -> dict[str, Path]:
    """Two exports with different weights; step-10 is the one tests/test_runtime.py uses."""
    root = session_dir / "runtime-tests"
    step20 = session_dir / "server-tests" / "step-20"
    if not step20.is_dir():
        checkpoint = build_checkpoint(root / "checkpoints", step=20, seed=1)
        export_checkpoint(checkpoint, step20, ExportConfig(quantize=False, huggingface=False, register_model=False),
                          Sampling(), None)
    return {"step-10": build_export(root, quantize=False, huggingface=False), "step-20": step20}


@pytest.fixture(scope="module")
def generators(exports: dict[str, Path]) -> dict[str, OnnxGenerator]:
    return {name: OnnxGenerator.load(folder) for name, folder in exports.items()}


@pytest.fixture(scope="module")
def server(exports: dict[str, Path], tmp_path_factory) -> Iterator[tuple[str, int]]:
    """``openllm serve`` without --model (so: every folder of models/export); (base URL, pid)."""
    work = tmp_path_factory.mktemp("serve")
    (work / "models" / "export").mkdir(parents=True)
    for name, folder in exports.items():
        (work / "models" / "export" / name).symlink_to(folder)
    write_params(work, {"serve": LIMITS})
    log = work / "server.log"
    process, base_url = start_server([], free_port(), log, cwd=work)
    yield base_url, process.pid
    stop_server(process)
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def client(server: tuple[str, int]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(server: tuple[str, int]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=30) as session:
        yield session


class SlowGenerator(OnnxGenerator):
    """A loaded model that sleeps ``delay`` seconds in each model call, counting the calls."""

    def __init__(self, model: OnnxGenerator, delay: float = 0.02) -> None:
        vars(self).update(vars(model))
        self.delay, self.calls = delay, 0

    def forward(self, *args: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        return super().forward(*args)


@contextlib.contextmanager
def live(models: dict[str, OnnxGenerator], api_key: str | None = None, **limits: Any) -> Iterator[str]:
    """Serve ``models`` with uvicorn in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    settings = ServeConfig(**limits)
    server = uvicorn.Server(uvicorn_config(create_app(models, settings, api_key), settings, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def busy(url: str) -> int:
    return httpx.get(f"{url}/health").json()["generations"]


def at_once(count: int, ask: Callable[[int], None]) -> None:
    """Call ``ask(0)`` .. ``ask(count - 1)`` in threads started together; wait for them all."""
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def openai_client(url: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", **{"api_key": "unused", "max_retries": 0, "timeout": 30, **options})


# --- loading ---------------------------------------------------------------------------


def test_load_models_names_and_errors(exports: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    for name in ("step-20", "step-10"):
        (export_dir / name).symlink_to(exports[name])
    (export_dir / "notes").mkdir()  # not an export: skipped
    (export_dir / ".step-30.tmp-x1y2").symlink_to(exports["step-10"])  # what a killed export leaves: never listed
    assert [p.name for p in find_exports(export_dir)] == ["step-10", "step-20"]  # step order
    assert list(load_models(export_dir=export_dir)) == ["step-10", "step-20"]
    assert list(load_models([str(exports["step-20"])])) == ["step-20"]
    with pytest.raises(ModelLoadError, match="both be called 'step-10'"):
        load_models([str(exports["step-10"]), str(export_dir / "step-10")])
    with pytest.raises(ModelLoadError, match="no exported model"):
        load_models(export_dir=tmp_path / "nothing")
    # Registry models keep their URI as id (the registry itself is tested in test_runtime.py).
    assert model_id("models:/openllm@best") == "models:/openllm@best"
    monkeypatch.setattr(OnnxGenerator, "load", lambda spec, quantized=False, spinning=True, engine="onnxruntime": f"{spec} {spinning}")
    assert load_models(["models:/openllm/3"]) == {"models:/openllm/3": "models:/openllm/3 False"}  # threads sleep


def test_serve_command_errors_are_one_line(tmp_path: Path) -> None:
    params = write_params(tmp_path, {})
    bad_port = run_openllm("--params", str(params), "serve", "--port", "0", cwd=tmp_path)
    assert bad_port.returncode == 2 and "serve.port=0" in bad_port.stderr
    nothing = run_openllm("--params", str(params), "serve", cwd=tmp_path)
    assert nothing.returncode == 2 and "no exported model" in nothing.stderr, nothing.stderr


# --- the subprocess server: answers ----------------------------------------------------


def test_health_models_and_loopback_only(server: tuple[str, int], http: httpx.Client, client: openai.OpenAI) -> None:
    assert http.get("/health").json() == {"status": "ok", "models": ["step-10", "step-20"], "generations": 0,
                                          "queued": 0, "batch_size": 8, "max_queued": 16}
    assert [m.id for m in client.models.list().data] == ["step-10", "step-20"]
    assert client.models.retrieve("step-20").owned_by == "openllm"
    listening = [c.laddr.ip for c in psutil.Process(server[1]).net_connections("tcp") if c.status == "LISTEN"]
    assert listening == ["127.0.0.1"]


def test_completion_is_the_runtimes(client: openai.OpenAI, generators: dict[str, OnnxGenerator]) -> None:
    response = client.completions.create(model="step-10", prompt=PROMPT, max_tokens=12, temperature=0.9,
                                         top_p=0.9, seed=5, extra_body={"top_k": 20})
    generator = generators["step-10"]
    expected = generator.generate(PROMPT, generator.sampling(temperature=0.9, top_p=0.9, top_k=20,
                                                             max_new_tokens=12, seed=5))
    choice = response.choices[0]
    assert (choice.text, choice.finish_reason, choice.index, choice.logprobs) == (
        expected.text, expected.finish_reason, 0, None)
    assert response.object == "text_completion" and response.model == "step-10" and response.id.startswith("cmpl-")
    usage = response.usage
    assert usage.prompt_tokens == len(generator.encode(PROMPT))
    assert usage.completion_tokens == expected.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_each_model_answers_with_its_own_weights(client: openai.OpenAI, generators: dict[str, OnnxGenerator]) -> None:
    texts = {}
    for name, generator in generators.items():
        texts[name] = client.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                                seed=0).choices[0].text
        assert texts[name] == generator.generate(PROMPT, generator.sampling(temperature=1.0, max_new_tokens=16,
                                                                            seed=0)).text
    assert texts["step-10"] != texts["step-20"]


def test_list_prompt_and_n(client: openai.OpenAI, generators: dict[str, OnnxGenerator]) -> None:
    prompts = [PROMPT, "To be"]
    response = client.completions.create(model="step-10", prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=11)
    generator = generators["step-10"]
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for i, choice in enumerate(response.choices):  # prompt i // n, seed + i
        sampling = generator.sampling(temperature=1.0, max_new_tokens=6, seed=11 + i)
        expected = generator.generate(prompts[i // 2], sampling)
        assert choice.text == expected.text
    assert response.usage.prompt_tokens == sum(len(generator.encode(p)) for p in prompts)  # each prompt once
    assert len({c.text for c in response.choices}) == 4


def test_stop_strings(client: openai.OpenAI, generators: dict[str, OnnxGenerator]) -> None:
    generator = generators["step-10"]
    full = generator.generate(PROMPT, generator.sampling(temperature=1.0, max_new_tokens=24, seed=2)).text
    stop = next(ch for ch in full[3:] if ch.isascii() and ch.isalnum())
    for stops in (stop, ["@@@", stop]):
        choice = client.completions.create(model="step-10", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=2,
                                           stop=stops).choices[0]
        assert (choice.text, choice.finish_reason) == (full[: full.find(stop)], "stop")


def test_streaming_pieces_join_to_the_completion(client: openai.OpenAI) -> None:
    request = dict(model="step-10", prompt=PROMPT, max_tokens=20, temperature=0.8, seed=3)
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert len(pieces) > 2 and "".join(p.text for p in pieces) == whole.choices[0].text
    assert [p.finish_reason for p in pieces] == [None] * (len(pieces) - 1) + [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_stream_wire_format(http: httpx.Client) -> None:
    body = {"model": "step-10", "prompt": [PROMPT], "n": 2, "max_tokens": 3, "stream": True, "seed": 1}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert "access-control-allow-origin" not in response.headers
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert set(indexes) == {0, 1}  # the two choices are generated together, so their pieces interleave
    for index in (0, 1):
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["index"] == index]
        assert finishes[-1] is not None and set(finishes[:-1]) <= {None}


def test_openai_client_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="step-10", prompt=PROMPT, temperature=3)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    assert "temperature=3" in info.value.message and info.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_tokens=500: at most 64") as info:
        client.completions.create(model="step-10", prompt=PROMPT, max_tokens=500)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError, match="'step-99' does not exist") as info:
        client.completions.create(model="step-99", prompt=PROMPT)
    assert (info.value.param, info.value.code) == ("model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("step-99")
    with pytest.raises(openai.BadRequestError, match="best_of.*not supported"):
        client.completions.create(model="step-10", prompt=PROMPT, best_of=3)


# --- the subprocess server: bad requests -----------------------------------------------

VALID = {"model": "step-10", "prompt": PROMPT, "max_tokens": 4}


def body(**changes: Any) -> bytes:
    """VALID with ``changes`` (a value of ... removes the field), as JSON bytes."""
    fields = {**VALID, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


def bad(name: str, status: int, param: str | None, fragment: str, content: Any = None, method: str = "POST",
        url: str = "/v1/completions", content_type: str | None = "application/json"):
    return pytest.param(method, url, content, content_type, status, param, fragment, id=name)


BAD_REQUESTS = [
    bad("malformed-json", 400, None, "not valid JSON", b'{"model": "step-10", "prompt": '),
    bad("json-not-an-object", 400, None, "must be a JSON object, got list", b'["step-10", "ROMEO"]'),
    bad("prompt-int", 400, "prompt", "string or a list of strings", body(prompt=5)),
    bad("prompt-token-ids", 400, "prompt", "string or a list of strings", body(prompt=[1, 2, 3])),
    bad("max-tokens-string", 400, "max_tokens", "valid integer", body(max_tokens="5")),
    bad("max-tokens-float", 400, "max_tokens", "valid integer", body(max_tokens=5.5)),
    bad("stream-string", 400, "stream", "valid boolean", body(stream="true")),
    bad("unknown-model", 404, "model", "does not exist", body(model="step-99")),
    bad("missing-model", 400, "model", "'model' is required", body(model=...)),
    bad("missing-prompt", 400, "prompt", "'prompt' is required", body(prompt=...)),
    bad("empty-prompt", 400, "prompt", "empty strings", body(prompt="")),
    bad("empty-prompt-list", 400, "prompt", "at least 1 item", body(prompt=[])),
    bad("huge-prompt", 400, "prompt", "at most 100 (serve.max_prompt_tokens)", body(prompt="to be or not " * 300)),
    bad("too-many-prompts", 400, "prompt", "at most 4 per request", body(prompt=["a"] * 5)),
    bad("max-tokens-negative", 400, "max_tokens", "greater than or equal to 0", body(max_tokens=-1)),
    bad("max-tokens-zero", 400, None, "only allowed with echo=true", body(max_tokens=0)),
    bad("max-tokens-enormous", 400, "max_tokens", "at most 64", body(max_tokens=10**30)),
    bad("temperature-nan", 400, None, "NaN is not a JSON value", body(temperature=float("nan"))),
    bad("temperature-infinity", 400, None, "Infinity is not a JSON value", body(temperature=float("inf"))),
    bad("temperature-overflow", 400, "temperature", "finite number",  # Python's json reads 1e999 as inf
        b'{"model": "step-10", "prompt": "a", "temperature": 1e999}'),
    bad("temperature-negative", 400, "temperature", "greater than or equal to 0", body(temperature=-0.5)),
    bad("temperature-above-2", 400, "temperature", "less than or equal to 2", body(temperature=2.5)),
    bad("top-p-zero", 400, "top_p", "greater than 0", body(top_p=0)),
    bad("top-p-above-1", 400, "top_p", "less than or equal to 1", body(top_p=1.5)),
    bad("top-k-negative", 400, "top_k", "greater than or equal to 0", body(top_k=-1)),
    bad("n-zero", 400, "n", "greater than or equal to 1", body(n=0)),
    bad("n-too-large", 400, "n", "at most 3 completions per prompt (serve.max_n)", body(n=10)),
    bad("seed-negative", 400, "seed", "greater than or equal to 0", body(seed=-1)),
    bad("stop-too-many", 400, "stop", "at most 4 items", body(stop=["a", "b", "c", "d", "e"])),
    bad("stop-empty-string", 400, "stop", "empty strings", body(stop="")),
    bad("stop-not-strings", 400, "stop", "string or a list of strings", body(stop=[1])),
    bad("unsupported-best-of", 400, "best_of", "not supported", body(best_of=2)),
    bad("logprobs-too-many", 400, "logprobs", "less than or equal to 5", body(logprobs=6)),
    bad("logprobs-in-a-stream", 400, "stream", "not supported with stream", body(logprobs=1, stream=True)),
    bad("lone-surrogate-prompt", 400, "prompt", "lone surrogate", b'{"model": "step-10", "prompt": "a\\ud800b"}'),
    bad("lone-surrogate-stop", 400, "stop", "stop[1] holds a lone surrogate",
        b'{"model": "step-10", "prompt": "a", "stop": ["x", "\\udfff"]}'),
    bad("lone-surrogate-model", 400, "model", "lone surrogate", b'{"model": "\\ud83d", "prompt": "a"}'),
    bad("prompt-and-max-tokens-beyond-context", 400, "prompt", "the model's context is 128 tokens, but",
        body(prompt="to be or not " * 10, max_tokens=64)),
    bad("misspelt-field", 400, "max_token", "unknown field 'max_token'", body(max_token=5)),
    bad("stream-options-wrong", 400, "stream_options", "valid boolean", body(stream_options={"include_usage": "yes"})),
    bad("invalid-utf8", 400, None, "not valid UTF-8", b'{"model": "step-10", "prompt": "\xff\xfe"}'),
    bad("body-too-large", 413, None, "larger than 8192 bytes", body(prompt="x" * 9000)),
    bad("chunked-body-too-large", 413, None, "larger than 8192 bytes", lambda: iter([b"{" + b" " * 1000] * 10)),
    bad("text-content-type", 415, None, "Content-Type: application/json", body(), content_type="text/plain"),
    bad("no-content-type", 415, None, "Content-Type: application/json", body(), content_type=None),
    bad("unknown-endpoint", 404, None, "unknown endpoint POST /v1/chat", body(), url="/v1/chat/completions"),
    bad("unknown-path", 404, None, "unknown endpoint GET /", method="GET", url="/"),
    bad("wrong-method", 405, None, "GET is not allowed on /v1/completions", method="GET"),
    bad("cors-preflight", 405, None, "OPTIONS is not allowed", method="OPTIONS"),
]


@pytest.mark.parametrize("method, url, content, content_type, status, param, fragment", BAD_REQUESTS)
def test_bad_request_gets_a_4xx_that_says_what_is_wrong(http: httpx.Client, method: str, url: str, content: Any,
                                                       content_type: str | None, status: int, param: str | None,
                                                       fragment: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    if method == "OPTIONS":  # what a browser sends before a cross-site POST
        headers.update({"origin": "https://example.com", "access-control-request-method": "POST"})
    response = http.request(method, url, content=content() if callable(content) else content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["param"] == param
    assert fragment in error["message"], error["message"]
    assert "access-control-allow-origin" not in response.headers


def test_still_serving_after_the_bad_requests(client: openai.OpenAI, http: httpx.Client) -> None:
    assert http.get("/health").json()["generations"] == 0
    assert client.completions.create(model="step-10", prompt=PROMPT, max_tokens=4).usage.completion_tokens > 0


# --- the subprocess server: load -------------------------------------------------------


def test_load_8_clients_no_errors_flat_memory(server: tuple[str, int]) -> None:
    base_url, pid = server
    result = measure(base_url, "step-10", pid, warmup=5, clients=8, requests_per_client=25, max_tokens=8)
    print("\nload test:", json.dumps(result, indent=2))
    assert result["errors"] == 0, result["first_errors"]
    assert result["requests"] == 200 and result["completion_tokens"] > 200
    assert result["p50_ms"] <= result["p95_ms"] < 10_000
    assert result["rss_growth_mb"] < 50, result


# --- in-process servers with a slow model: the queue, time limits, disconnects ---------


def ask_in_threads(url: str, count: int, **request: Any) -> list[tuple[str, float, str]]:
    """``count`` concurrent completions; (outcome, seconds, text or error message) each."""
    outcomes: list[tuple[str, float, str]] = []

    def ask() -> None:
        started = time.perf_counter()
        try:
            text = openai_client(url).completions.create(**request).choices[0].text
            outcomes.append(("ok", time.perf_counter() - started, text))
        except openai.RateLimitError as exc:
            outcomes.append(("429", time.perf_counter() - started, exc.message))

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_full_queue_answers_429_at_once_and_queued_requests_complete(generators: dict[str, OnnxGenerator]) -> None:
    slow = SlowGenerator(generators["step-10"])
    request = dict(model="step-10", prompt=PROMPT, max_tokens=60, temperature=0)  # >= 1.2 s each, one at a time
    with live({"step-10": slow}, batch_size=1, max_queued=2) as url:
        outcomes = ask_in_threads(url, 6, **request)
        started = time.perf_counter()
        assert busy(url) == 0  # the event loop answers at once
        assert time.perf_counter() - started < 0.5
    kinds = sorted(kind for kind, _, _ in outcomes)
    assert kinds == ["429"] * 3 + ["ok"] * 3, outcomes  # one generating, two waiting, three refused
    for kind, seconds, message in outcomes:
        if kind == "429":
            assert seconds < 1.0 and "serve.max_queued" in message  # not after the running one
    texts = {text for kind, _, text in outcomes if kind == "ok"}
    assert texts == {generators["step-10"].generate(PROMPT, generators["step-10"].sampling(
        temperature=0, max_new_tokens=60)).text}


def test_concurrent_requests_share_steps_and_keep_their_seeded_text(generators: dict[str, OnnxGenerator]) -> None:
    """8 clients at once: each gets what the runtime alone writes for its seed, in fewer model calls."""
    slow = SlowGenerator(generators["step-10"], delay=0.005)
    prompts = [PROMPT, "To be", "Hi", "東京 🙂", "KING:", "a", "Now is", "O"]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = openai_client(url).completions.create(model="step-10", prompt=prompts[i], max_tokens=20,
                                                           temperature=1.0, seed=100 + i).choices[0].text

    with live({"step-10": slow}, batch_size=8) as url:
        at_once(8, ask)
    generator = generators["step-10"]
    for i, prompt in enumerate(prompts):
        assert results[i] == generator.generate(prompt, generator.sampling(temperature=1.0, max_new_tokens=20,
                                                                           seed=100 + i)).text
    assert slow.calls < 8 * 21 * 0.75  # alone, each request makes up to 21 model calls


def test_queued_request_whose_client_leaves_is_dropped(generators: dict[str, OnnxGenerator]) -> None:
    slow = SlowGenerator(generators["step-10"])
    request = {"model": "step-10", "prompt": PROMPT, "max_tokens": 60, "temperature": 0}
    with live({"step-10": slow}, batch_size=1, max_queued=1) as url:
        runner = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", json=request, timeout=30))
        runner.start()
        wait_for(lambda: busy(url) == 1, 5)
        with pytest.raises(httpx.ReadTimeout):  # waits in the queue, then gives up
            httpx.post(f"{url}/v1/completions", json=request, timeout=0.3)
        wait_for(lambda: httpx.get(f"{url}/health").json()["queued"] == 0, 2)  # its place is free again
        response = httpx.post(f"{url}/v1/completions", json={**request, "max_tokens": 2}, timeout=30)
        assert response.status_code == 200  # queued behind the runner, not refused
        runner.join(30)


def test_time_limit_stops_the_generation(generators: dict[str, OnnxGenerator]) -> None:
    slow = SlowGenerator(generators["step-10"])
    request = {"model": "step-10", "prompt": PROMPT, "max_tokens": 100, "temperature": 0}
    with live({"step-10": slow}, request_timeout_seconds=0.3) as url:
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/completions", json=request, timeout=30)
        assert time.perf_counter() - started < 1.5  # 100 calls would take 2 s
        assert response.status_code == 504 and response.json()["error"]["code"] == "generation_timeout"
        assert response.headers["x-should-retry"] == "false"
        assert slow.calls < 40
        with pytest.raises(openai.APIError, match="took longer than 0.3 s"):
            for _ in openai_client(url).completions.create(**request, stream=True):
                pass
        wait_for(lambda: busy(url) == 0, 2)


def test_client_that_disconnects_stops_its_generation(generators: dict[str, OnnxGenerator]) -> None:
    slow = SlowGenerator(generators["step-10"])
    request = {"model": "step-10", "prompt": PROMPT, "max_tokens": 120, "temperature": 0}
    with live({"step-10": slow}, batch_size=1) as url:
        with httpx.Client(base_url=url, timeout=30) as session:
            with session.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
                assert next(response.iter_lines()).startswith("data: {")
        # Leaving the block closed the connection mid-stream.
        wait_for(lambda: busy(url) == 0, 2)
        stopped_at = slow.calls
        time.sleep(0.2)
        assert slow.calls == stopped_at < 60

        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(f"{url}/v1/completions", json=request, timeout=0.3)
        wait_for(lambda: busy(url) == 0, 2)
        assert slow.calls - stopped_at < 60
        assert openai_client(url).completions.create(model="step-10", prompt=PROMPT, max_tokens=3).choices[0].finish_reason


def test_registry_ids_work_in_urls_and_requests(generators: dict[str, OnnxGenerator]) -> None:
    with live({"models:/openllm@best": generators["step-10"]}) as url:
        client = openai_client(url)
        assert client.models.retrieve("models:/openllm@best").id == "models:/openllm@best"
        response = client.completions.create(model="models:/openllm@best", prompt=PROMPT, max_tokens=3)
        assert response.model == "models:/openllm@best"


# --- operators: metrics, authentication, output filter, lineage, HTTP-layer limits -----


def metric(text: str, sample_name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition, parsed by prometheus_client."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {sample_name} {labels}")


def test_metrics_in_prometheus_text_format(generators: dict[str, OnnxGenerator]) -> None:
    with live({"step-10": generators["step-10"]}) as url:
        client = openai_client(url)
        reply = client.completions.create(model="step-10", prompt=PROMPT, max_tokens=5, seed=1)
        streamed = list(client.completions.create(model="step-10", prompt="To be", max_tokens=4, seed=2,
                                                  stream=True, stream_options={"include_usage": True}))
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="step-10", prompt=PROMPT, temperature=3)
        response = httpx.get(f"{url}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    assert metric(text, "openllm_http_requests_total", endpoint="/v1/completions", status="200") == 2
    assert metric(text, "openllm_http_requests_total", endpoint="/v1/completions", status="400") == 1
    usage = streamed[-1].usage
    assert metric(text, "openllm_prompt_tokens_total", model="step-10") == reply.usage.prompt_tokens + usage.prompt_tokens
    assert metric(text, "openllm_generation_tokens_total", model="step-10") == (
        reply.usage.completion_tokens + usage.completion_tokens)
    assert metric(text, "openllm_time_to_first_token_seconds_count", model="step-10") == 2
    assert metric(text, "openllm_request_latency_seconds_count", model="step-10") == 2
    assert metric(text, "openllm_request_latency_seconds_bucket", model="step-10", le="+Inf") == 2
    assert metric(text, "openllm_queue_depth", model="step-10") == 0
    assert metric(text, "openllm_running_generations", model="step-10") == 0


def test_bearer_token_is_required_when_configured(generators: dict[str, OnnxGenerator]) -> None:
    request = dict(model="step-10", prompt=PROMPT, max_tokens=3)
    with live({"step-10": generators["step-10"]}, api_key="s3cret-key") as url:
        with pytest.raises(openai.AuthenticationError, match="OPENLLM_API_KEY"):
            openai_client(url).completions.create(**request)  # the openai package sends "Bearer unused"
        with pytest.raises(openai.AuthenticationError):
            openai_client(url, api_key="s3cret-ke").models.list()
        raw = httpx.post(f"{url}/v1/completions", json=request)  # no header at all
        assert raw.status_code == 401 and raw.json()["error"]["code"] == "invalid_api_key"
        assert raw.headers["www-authenticate"] == "Bearer"
        assert openai_client(url, api_key="s3cret-key").completions.create(**request).usage.completion_tokens > 0
        assert httpx.get(f"{url}/health").status_code == 200  # probes and scrapers need no key
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_serving_beyond_loopback_needs_a_key_unless_waived(exports: dict[str, Path], tmp_path: Path,
                                                           monkeypatch) -> None:
    params = write_params(tmp_path, {})
    refused = run_openllm("--params", str(params), "serve", "--host", "0.0.0.0", "--model", str(exports["step-10"]),
                          cwd=tmp_path, OPENLLM_API_KEY="")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "$OPENLLM_API_KEY" in lines[0], refused.stderr
    monkeypatch.delenv("OPENLLM_API_KEY", raising=False)
    assert api_key_for(ServeConfig(host="0.0.0.0", allow_unauthenticated=True)) is None
    assert api_key_for(ServeConfig()) is None  # loopback: no key needed
    monkeypatch.setenv("MY_KEY", "abc")
    assert api_key_for(ServeConfig(host="0.0.0.0", api_key_env="MY_KEY")) == "abc"


def test_output_filter_ends_the_choice_with_content_filter(generators: dict[str, OnnxGenerator]) -> None:
    generator = generators["step-10"]
    full = generator.generate(PROMPT, generator.sampling(temperature=1.0, max_new_tokens=24, seed=2)).text
    word = next(full[i:i + 2] for i in range(3, len(full)) if full[i:i + 2].isalpha())
    pattern = re.escape(word.swapcase())  # matched without regard to case
    cut = full[: re.search(pattern, full, re.IGNORECASE).start()]
    request = dict(model="step-10", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=2)
    with live({"step-10": generator}, output_filter=[pattern, "never-written-\\d+"]) as url:
        client = openai_client(url)
        choice = client.completions.create(**request).choices[0]
        assert (choice.text, choice.finish_reason) == (cut, "content_filter")
        chunks = [c.choices[0] for c in client.completions.create(**request, stream=True)]
        assert "".join(c.text for c in chunks) == cut and chunks[-1].finish_reason == "content_filter"
        text = httpx.get(f"{url}/metrics").text
    assert metric(text, "openllm_content_filtered_total", model="step-10") == 2


def test_logprobs_are_the_log_softmax_of_the_runtime_logits(client: openai.OpenAI,
                                                           generators: dict[str, OnnxGenerator]) -> None:
    generator = generators["step-10"]
    prompt = generator.encode(PROMPT)
    reply = client.completions.create(model="step-10", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    written = generator.generate_tokens([prompt], generator.sampling(temperature=0, max_new_tokens=6))[0].token_ids
    ids = np.asarray([prompt + written])
    logits, _ = generator.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], None)
    expected = log_softmax(logits[0])
    logprobs = reply.choices[0].logprobs
    want = [expected[len(prompt) - 1 + j, token] for j, token in enumerate(written)]
    assert np.allclose(logprobs.token_logprobs, want, atol=1e-4)
    assert logprobs.tokens == [generator.token_text(t) for t in written]
    for top, chosen in zip(logprobs.top_logprobs, logprobs.token_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy: the most likely one

    echoed = client.completions.create(model="step-10", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = echoed.choices[0]
    assert choice.text == PROMPT and echoed.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None
    want = [expected[t - 1, prompt[t]] for t in range(1, len(prompt))]
    assert np.allclose(choice.logprobs.token_logprobs[1:], want, atol=1e-4)


def test_model_lineage(http: httpx.Client, generators: dict[str, OnnxGenerator]) -> None:
    card = http.get("/v1/models/step-20").json()
    config = generators["step-20"].config
    lineage = card["lineage"]
    assert card["id"] == "step-20" and lineage["checkpoint_step"] == 20
    assert lineage["onnx_sha256"] == config["sha256"]["model.onnx"]
    assert set(lineage) >= {"code_sha256", "data_sha256", "tokenizer_sha256", "params_sha256", "val_bits_per_byte",
                            "registry_version", "mlflow_run_id"}


def test_lineage_names_the_training_run_beside_the_checkpoints(exports: dict[str, Path], tmp_path: Path) -> None:
    from openllm import tracking
    from openllm.server_ops import lineage

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "export").mkdir()
    shutil.copytree(exports["step-10"], tmp_path / "models" / "export" / "step-10")
    tracking.write_run_id(tmp_path / "models" / "checkpoints", "0123abcd")
    generator = OnnxGenerator.load(tmp_path / "models" / "export" / "step-10")
    assert lineage(generator)["mlflow_run_id"] == "0123abcd"


def raw_socket(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_http_layer_limits(generators: dict[str, OnnxGenerator]) -> None:
    with live({"step-10": generators["step-10"]}, client_timeout_seconds=0.5, max_header_bytes=1024,
              max_connections=4) as url:
        slow = raw_socket(url)  # a client that never finishes its request head is closed
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        time.sleep(1.0)
        assert slow.recv(100) == b""
        big = raw_socket(url)  # a head that grows past max_header_bytes without ending
        big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000)
        assert big.recv(100).startswith(b"HTTP/1.1 400")
        stalled = raw_socket(url)  # a body that stops arriving: 408 after client_timeout_seconds
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"model\"")
        assert stalled.recv(1000).startswith(b"HTTP/1.1 408")
        idle = [raw_socket(url) for _ in range(4)]  # max_connections: the next request gets 503
        time.sleep(0.1)
        assert httpx.get(f"{url}/health").status_code == 503
        for sock in [slow, big, stalled, *idle]:
            sock.close()
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, 5)


def test_a_flood_of_connections_cannot_use_up_the_open_files(exports: dict[str, Path], tmp_path: Path) -> None:
    """300 clients that never finish a request, against a server allowed 128 open files at start."""
    params = write_params(tmp_path, {"serve": {"max_connections": 16, "client_timeout_seconds": 1.0}})
    serve = [sys.executable, "-m", "openllm", "--params", str(params), "serve", "--model", str(exports["step-10"])]
    refused = subprocess.run(["prlimit", "--nofile=100:100", *serve], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "serve.max_connections=16 needs 272 open files" in refused.stderr, refused.stderr
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "wb") as out:  # a soft limit below what 16 connections need: the server raises it
        process = subprocess.Popen(["prlimit", "--nofile=128:20000", *serve, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        flood = [raw_socket(url) for _ in range(300)]
        for sock in flood:
            with contextlib.suppress(OSError):  # past the limit the server has already closed it
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")

        def health() -> int | None:  # None: the connection was closed at once (past the limit)
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{url}/health", timeout=5).status_code
            return None

        started = time.monotonic()
        health()  # 503, a closed connection, or 200 if the slow heads have timed out already
        assert time.monotonic() - started < 2  # but an answer at once, never a hang
        wait_for(lambda: health() == 200, 10)  # the slow heads are closed after client_timeout_seconds
        for sock in flood:
            sock.close()
    finally:
        stop_server(process)
    output = log.read_text(errors="replace")
    assert "Too many open files" not in output and len(output) < 20_000, output[-3000:]


def test_the_genai_engine_serves_concurrent_requests(exports: dict[str, Path], generators: dict[str, OnnxGenerator],
                                                     tmp_path: Path) -> None:
    """``serve.engine: genai``: a real server, 6 clients at once; greedy text equals the default engine's."""
    write_params(tmp_path, {"serve": {**LIMITS, "engine": "genai"}})
    log = tmp_path / "server.log"
    process, base_url = start_server([str(exports["step-10"])], free_port(), log, cwd=tmp_path)
    try:
        prompts = [PROMPT, "To be", "Hi", "KING:", "Now is", "O"]
        results: dict[int, Any] = {}

        def ask(i: int) -> None:
            results[i] = openai_client(base_url).completions.create(model="step-10", prompt=prompts[i], max_tokens=20,
                                                                    temperature=0.0).choices[0]

        at_once(len(prompts), ask)
        generator = generators["step-10"]
        for i, prompt in enumerate(prompts):
            expected = generator.generate(prompt, generator.sampling(temperature=0.0, max_new_tokens=20))
            assert (results[i].text, results[i].finish_reason) == (expected.text, expected.finish_reason)
        sampled = [openai_client(base_url).completions.create(model="step-10", prompt=PROMPT, max_tokens=16,
                                                              temperature=1.0, seed=9).choices[0].text for _ in "ab"]
        assert sampled[0] == sampled[1] and sampled[0]
        with httpx.Client(base_url=base_url, timeout=30) as http:
            refused = http.post("/v1/completions", json={"model": "step-10", "prompt": PROMPT, "logprobs": 2})
            assert refused.status_code == 400
            assert "logprobs are not available with serve.engine=genai" in refused.json()["error"]["message"]
            streamed = http.post("/v1/completions", json={"model": "step-10", "prompt": PROMPT, "max_tokens": 20,
                                                          "temperature": 0, "stream": True})
            pieces = [json.loads(line[6:])["choices"][0]["text"] for line in streamed.text.splitlines()
                      if line.startswith("data: {")]
            assert "".join(pieces) == results[0].text
    finally:
        stop_server(process)
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]
