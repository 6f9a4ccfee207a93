"""Tests for openllm.server (`openllm serve`): the official openai client and raw HTTP, live.

Two kinds of server, both on 127.0.0.1 with a free port:

- ``server``: ``openllm serve`` in a subprocess, started in a folder whose models/export holds
  two exports with different weights (step-10, step-20) and whose params.yaml has small
  limits. Its process id lets the load test read the server's memory.
- ``live(models, **limits)``: uvicorn in a thread of this process, serving a
  :class:`SlowGenerator` (the tiny model is done in milliseconds; this one sleeps between text
  pieces), to test concurrency, the time limit and clients that disconnect.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import openai
import psutil
import pytest
import uvicorn

from fixtures_export import build_checkpoint, build_export
from helpers import REPO_ROOT, run_openllm, write_params
from openllm.config import ExportConfig, SamplingConfig, ServeConfig
from openllm.export import export_checkpoint
from openllm.runtime import ModelLoadError, OnnxGenerator
from openllm.server import create_app, find_exports, load_models, model_id

sys.path.insert(0, str(REPO_ROOT / "bench"))
from server_load import free_port, measure, start_server, stop_server  # noqa: E402

LIMITS = dict(max_prompt_tokens=100, max_tokens=64, max_body_bytes=8192, max_n=3, max_prompts=4,
              max_concurrent=8, request_timeout_seconds=30)
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
                          SamplingConfig(), None)
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
    """A loaded model that sleeps ``delay`` seconds after each text piece, counting them."""

    def __init__(self, model: OnnxGenerator, delay: float = 0.02) -> None:
        vars(self).update(vars(model))
        self.delay, self.pieces = delay, 0

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        for piece in super().stream(*args, **kwargs):
            self.pieces += 1
            time.sleep(self.delay)
            yield piece


@contextlib.contextmanager
def live(models: dict[str, OnnxGenerator], **limits: Any) -> Iterator[str]:
    """Serve ``models`` with uvicorn in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(models, ServeConfig(**limits)), log_level="warning",
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


# --- loading ---------------------------------------------------------------------------


def test_load_models_names_and_errors(exports: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    for name in ("step-20", "step-10"):
        (export_dir / name).symlink_to(exports[name])
    (export_dir / "notes").mkdir()  # not an export: skipped
    assert [p.name for p in find_exports(export_dir)] == ["step-10", "step-20"]  # step order
    assert list(load_models(export_dir=export_dir)) == ["step-10", "step-20"]
    assert list(load_models([str(exports["step-20"])])) == ["step-20"]
    with pytest.raises(ModelLoadError, match="both be called 'step-10'"):
        load_models([str(exports["step-10"]), str(export_dir / "step-10")])
    with pytest.raises(ModelLoadError, match="no exported model"):
        load_models(export_dir=tmp_path / "nothing")
    # Registry models keep their URI as id (the registry itself is tested in test_runtime.py).
    assert model_id("models:/openllm@best") == "models:/openllm@best"
    monkeypatch.setattr(OnnxGenerator, "load", lambda spec, quantized=False: f"loaded {spec}")
    assert load_models(["models:/openllm/3"]) == {"models:/openllm/3": "loaded models:/openllm/3"}


def test_serve_command_errors_are_one_line(tmp_path: Path) -> None:
    params = write_params(tmp_path, {})
    bad_port = run_openllm("--params", str(params), "serve", "--port", "0", cwd=tmp_path)
    assert bad_port.returncode == 2 and "serve.port=0" in bad_port.stderr
    nothing = run_openllm("--params", str(params), "serve", cwd=tmp_path)
    assert nothing.returncode == 2 and "no exported model" in nothing.stderr, nothing.stderr


# --- the subprocess server: answers ----------------------------------------------------


def test_health_models_and_loopback_only(server: tuple[str, int], http: httpx.Client, client: openai.OpenAI) -> None:
    assert http.get("/health").json() == {"status": "ok", "models": ["step-10", "step-20"], "generations": 0,
                                          "max_concurrent": 8}
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
    assert indexes == sorted(indexes) and set(indexes) == {0, 1}  # the choices one after the other
    assert [c["choices"][0]["finish_reason"] is not None for c in chunks].count(True) == 2


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
    with pytest.raises(openai.BadRequestError, match="echo.*not supported"):
        client.completions.create(model="step-10", prompt=PROMPT, echo=True)


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
    bad("max-tokens-negative", 400, "max_tokens", "greater than or equal to 1", body(max_tokens=-1)),
    bad("max-tokens-zero", 400, "max_tokens", "greater than or equal to 1", body(max_tokens=0)),
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
    bad("unsupported-echo", 400, "echo", "not supported", body(echo=True)),
    bad("unsupported-logprobs", 400, "logprobs", "not supported", body(logprobs=3)),
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


# --- in-process servers with a slow model ----------------------------------------------


def test_busy_server_answers_429_at_once(generators: dict[str, OnnxGenerator]) -> None:
    slow = SlowGenerator(generators["step-10"])
    outcomes: list[tuple[str, float, str]] = []
    with live({"step-10": slow}, max_concurrent=1) as url:

        def ask() -> None:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
            started = time.perf_counter()
            try:
                client.completions.create(model="step-10", prompt=PROMPT, max_tokens=100, temperature=0)  # >= 2 s
                outcomes.append(("ok", time.perf_counter() - started, ""))
            except openai.RateLimitError as exc:
                outcomes.append(("429", time.perf_counter() - started, exc.message))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: busy(url) == 1, 2)  # the event loop answers during a generation...
        started = time.perf_counter()
        assert busy(url) == 1
        assert time.perf_counter() - started < 0.5  # ...at once
        for thread in threads:
            thread.join(30)
    kinds = sorted(kind for kind, _, _ in outcomes)
    assert kinds.count("ok") >= 1 and kinds.count("429") >= 2, outcomes
    for kind, seconds, message in outcomes:
        if kind == "429":
            assert seconds < 1.5 and "serve.max_concurrent" in message  # not after the running one


def test_time_limit_stops_the_generation(generators: dict[str, OnnxGenerator]) -> None:
    slow = SlowGenerator(generators["step-10"])
    request = {"model": "step-10", "prompt": PROMPT, "max_tokens": 100, "temperature": 0}
    with live({"step-10": slow}, request_timeout_seconds=0.3) as url:
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/completions", json=request, timeout=30)
        assert time.perf_counter() - started < 1.5  # 100 pieces would take 2 s
        assert response.status_code == 504 and response.json()["error"]["code"] == "generation_timeout"
        assert response.headers["x-should-retry"] == "false"
        assert slow.pieces < 40
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIError, match="took longer than 0.3 s"):
            for _ in client.completions.create(**request, stream=True):
                pass
        wait_for(lambda: busy(url) == 0, 2)


def test_client_that_disconnects_stops_its_generation(generators: dict[str, OnnxGenerator]) -> None:
    slow = SlowGenerator(generators["step-10"])
    request = {"model": "step-10", "prompt": PROMPT, "max_tokens": 120, "temperature": 0}
    with live({"step-10": slow}, max_concurrent=1) as url:
        with httpx.Client(base_url=url, timeout=30) as session:
            with session.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
                assert next(response.iter_lines()).startswith("data: {")
        # Leaving the block closed the connection mid-stream.
        wait_for(lambda: busy(url) == 0, 2)
        stopped_at = slow.pieces
        time.sleep(0.2)
        assert slow.pieces == stopped_at < 60

        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(f"{url}/v1/completions", json=request, timeout=0.3)
        wait_for(lambda: busy(url) == 0, 2)
        assert slow.pieces - stopped_at < 60

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        assert client.completions.create(model="step-10", prompt=PROMPT, max_tokens=3).choices[0].finish_reason


def test_registry_ids_work_in_urls_and_requests(generators: dict[str, OnnxGenerator]) -> None:
    with live({"models:/openllm@best": generators["step-10"]}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        assert client.models.retrieve("models:/openllm@best").id == "models:/openllm@best"
        response = client.completions.create(model="models:/openllm@best", prompt=PROMPT, max_tokens=3)
        assert response.model == "models:/openllm@best"
