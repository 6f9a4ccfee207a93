"""Load test of ``openllm serve``: concurrent OpenAI clients, latency, tokens/s, memory, the queue.

    python bench/server_load.py --model models/export/step-2400 --out bench-server.json
    python bench/server_load.py --model bench/.work/export/step-0 --baseline-ref 62bf446
    python bench/server_load.py --url http://127.0.0.1:8000 --model step-2400 --pid 12345

Without ``--url`` it starts ``openllm serve --model MODEL`` on a free port of 127.0.0.1 itself
(with params.yaml's ``serve`` section, ``batch_size`` set to ``--clients``) and stops it at the
end; with ``--url`` it uses a running server, whose process id ``--pid`` lets it read the
memory. ``--clients`` threads, each with its own ``openai.OpenAI`` client, send ``--requests``
non-streaming completions one after the other (``--max-tokens`` new tokens, a different seed
each). After a short warm-up (which is not measured) it reports:

- latency percentiles p50 / p95 / max of whole requests, as clients see them;
- tokens/s: completion tokens of all clients / wall time (throughput, not per request);
- the server's resident memory (RSS) before and after the measured requests: steady growth
  over a few hundred requests would mean a leak;
- ``overload``: ``--overload-clients`` clients without retries, each sending ``--requests``
  requests, against the server with its default ``serve`` limits: how many get 429.

``--baseline-ref REF`` runs the same measurements, in the same run, against the server of git
commit REF too (its ``src/`` and params.yaml, e.g. the thread-per-request server before
cross-request batching, where ``serve.max_concurrent`` is raised to ``--clients``), and reports
the ratios. Both servers run at once and take turns in ``--rounds`` rounds, so a burst of load
from elsewhere on the machine slows both rather than one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psutil
import yaml


def latency_figures(latencies: list[float]) -> dict[str, float]:
    """p50, p95 (nearest rank: a latency some request really had) and max, in milliseconds."""
    if not latencies:
        return {}
    p50, p95 = np.percentile(latencies, [50, 95], method="inverted_cdf")
    return {"p50_ms": 1000 * float(p50), "p95_ms": 1000 * float(p95), "max_ms": 1000 * max(latencies)}


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid``, in MiB."""
    return psutil.Process(pid).memory_info().rss / 2**20


def run_load(
    base_url: str, model: str, clients: int = 8, requests_per_client: int = 25, max_tokens: int = 16,
    prompt: str = "ROMEO:\n", timeout: float = 60.0,
) -> dict[str, Any]:
    """Send ``clients * requests_per_client`` completions from ``clients`` threads; the figures."""
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0
    lock = threading.Lock()

    def one_client(number: int) -> None:
        nonlocal tokens
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=timeout)
        with client:
            for i in range(requests_per_client):
                started = time.perf_counter()
                try:
                    response = client.completions.create(
                        model=model, prompt=prompt, max_tokens=max_tokens, seed=number * requests_per_client + i,
                    )
                except openai.OpenAIError as exc:  # counted, and the client goes on
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    tokens += response.usage.completion_tokens

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    result: dict[str, Any] = {
        "clients": clients, "requests": len(latencies) + len(errors), "errors": len(errors),
        "first_errors": errors[:5], "all_errors": errors, "latencies": latencies, "max_tokens": max_tokens,
        "wall_seconds": wall,
        "completion_tokens": tokens, "tokens_per_second": tokens / wall, "requests_per_second": len(latencies) / wall,
    }
    return result | latency_figures(latencies)


def measure(base_url: str, model: str, pid: int | None = None, warmup: int = 2, **load: Any) -> dict[str, Any]:
    """A warm-up round, then :func:`run_load` with the server's RSS read before and after."""
    run_load(base_url, model, clients=load.get("clients", 8), requests_per_client=warmup,
             max_tokens=load.get("max_tokens", 16))
    before = rss_mb(pid) if pid else None
    result = run_load(base_url, model, **load)
    del result["all_errors"], result["latencies"]
    if pid:
        after = rss_mb(pid)
        result.update(rss_before_mb=before, rss_after_mb=after, rss_growth_mb=after - before)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(base_url: str, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Poll ``GET /health`` until it answers 200; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base_url} did not become healthy in {timeout:g} s")


def start_server(models: list[str], port: int, log: Path, cwd: str | Path = ".", params: str = "params.yaml",
                 source: Path | None = None):
    """``openllm serve`` in a subprocess (output in ``log``); returns (process, base URL) once healthy.

    ``source``: a folder holding another version's ``src/openllm`` to run instead of this one.
    """
    command = [sys.executable, "-m", "openllm", "--params", params, "serve", "--port", str(port)]
    for model in models:
        command += ["--model", model]
    env = dict(os.environ, PYTHONPATH=str(Path(source) / "src")) if source else None
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process)
    except RuntimeError as exc:
        stop_server(process)
        raise RuntimeError(f"{exc}; its output:\n{Path(log).read_text(errors='replace')[-3000:]}") from None
    return process, base_url


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()  # uvicorn shuts down cleanly on SIGTERM
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def checkout(ref: str, folder: Path) -> Path:
    """``src/`` and params.yaml of git commit ``ref``, extracted into ``folder``."""
    archive = subprocess.run(["git", "archive", ref, "src", "params.yaml"], check=True, capture_output=True).stdout
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def write_serve_params(source: Path, out: Path, **serve: Any) -> Path:
    """``source``'s params.yaml with ``serve`` keys changed, written to ``out``."""
    params = yaml.safe_load(source.read_text(encoding="utf-8"))
    params.setdefault("serve", {}).update(serve)
    out.write_text(yaml.safe_dump(params), encoding="utf-8")
    return out


def count_429(base_url: str, model: str, clients: int, requests_per_client: int, max_tokens: int) -> dict[str, int]:
    """Clients without retries, all at once: requests that got 429, of all requests sent."""
    result = run_load(base_url, model, clients=clients, requests_per_client=requests_per_client, max_tokens=max_tokens)
    refused = sum("RateLimitError" in e for e in result.pop("all_errors"))
    return {"clients": clients, "requests": result["requests"], "rate_limited": refused,
            "other_errors": result["errors"] - refused}


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of several :func:`run_load` rounds taken as one measurement."""
    latencies = [x for part in parts for x in part["latencies"]]
    wall = sum(part["wall_seconds"] for part in parts)
    tokens = sum(part["completion_tokens"] for part in parts)
    result = {"clients": parts[0]["clients"], "requests": sum(part["requests"] for part in parts),
              "errors": sum(part["errors"] for part in parts), "first_errors": parts[0]["first_errors"],
              "max_tokens": parts[0]["max_tokens"], "wall_seconds": wall, "completion_tokens": tokens,
              "tokens_per_second": tokens / wall, "requests_per_second": len(latencies) / wall}
    return result | latency_figures(latencies)


def start(model: str, params: Path, log: Path, source: Path | None, **limits: Any):
    """A server with ``limits`` in its serve section; (process, base URL, model id)."""
    settings = write_serve_params(params, log.with_suffix(".yaml"), **limits)
    process, base_url = start_server([model], free_port(), log, params=str(settings), source=source)
    return process, base_url, httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]


def bench_servers(versions: dict[str, tuple[Path, Path | None, dict[str, Any]]], args: argparse.Namespace,
                  workdir: Path) -> dict[str, dict[str, Any]]:
    """Each version's speed, all servers up at once and measured in alternating rounds (so that load
    from elsewhere on the machine hits every version alike), then each one's 429s under overload."""
    results: dict[str, dict[str, Any]] = {name: {} for name in versions}
    servers = {}
    try:
        for name, (params, source, limits) in versions.items():
            servers[name] = start(args.model, params, workdir / f"{name}.log", source, **limits)
        for process, url, model in servers.values():
            run_load(url, model, clients=args.clients, requests_per_client=2, max_tokens=args.max_tokens)  # warm-up
        before = {name: rss_mb(process.pid) for name, (process, _, _) in servers.items()}
        parts: dict[str, list] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (_, url, model) in servers.items():
                parts[name].append(run_load(url, model, clients=args.clients, max_tokens=args.max_tokens,
                                            requests_per_client=max(1, args.requests // args.rounds),
                                            prompt=args.prompt))
        for name, (process, _, _) in servers.items():
            after = rss_mb(process.pid)
            results[name].update(combine(parts[name]), rss_before_mb=before[name], rss_after_mb=after,
                                 rss_growth_mb=after - before[name])
    finally:
        for process, _, _ in servers.values():
            stop_server(process)
    for name, (params, source, _) in versions.items():  # default limits
        process, url, model = start(args.model, params, workdir / f"{name}-default.log", source)
        try:
            results[name]["overload"] = count_429(url, model, args.overload_clients, args.requests, args.max_tokens)
        finally:
            stop_server(process)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="export folder or models:/ URI; with --url: a model id")
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, to read its memory")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--overload-clients", type=int, default=16, help="clients of the overload measurement")
    parser.add_argument("--baseline-ref", help="also measure the server of this git commit, in the same run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds (with --baseline-ref)")
    parser.add_argument("--params", default="params.yaml", help="without --url: the server's parameters")
    parser.add_argument("--out", type=Path, default=Path("bench-server.json"))
    args = parser.parse_args()

    load = dict(clients=args.clients, requests_per_client=args.requests, max_tokens=args.max_tokens, prompt=args.prompt)
    if args.url:
        result = measure(args.url.rstrip("/"), args.model, args.pid, **load)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            versions = {"this": (Path(args.params), None, {"batch_size": args.clients})}
            if args.baseline_ref:
                source = checkout(args.baseline_ref, Path(tmp) / "baseline")
                versions["baseline"] = (source / "params.yaml", source, {"max_concurrent": args.clients})
            results = bench_servers(versions, args, Path(tmp))
        result = results["this"]
        if args.baseline_ref:
            baseline = results["baseline"]
            result["baseline"] = {"ref": args.baseline_ref, **baseline}
            result["tokens_per_second_vs_baseline"] = result["tokens_per_second"] / baseline["tokens_per_second"]
            result["p95_vs_baseline"] = result["p95_ms"] / baseline["p95_ms"]
    result.update(model=args.model, cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d"),
                  load_average_at_end=round(os.getloadavg()[0], 1))  # other work on the machine
    report(result, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    for name, r in (("this server", result), (f"baseline {args.baseline_ref}", result.get("baseline"))):
        if not r:
            continue
        print(f"{name}: {r['requests']} requests from {r['clients']} clients, {args.max_tokens} max tokens: "
              f"{r['errors']} errors")
        if "p50_ms" in r:
            print(f"  latency p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, max {r['max_ms']:.0f} ms; "
                  f"{r['tokens_per_second']:.0f} tokens/s, {r['requests_per_second']:.1f} requests/s")
        if "rss_before_mb" in r:
            print(f"  server RSS {r['rss_before_mb']:.1f} MiB before, {r['rss_after_mb']:.1f} MiB after "
                  f"({r['rss_growth_mb']:+.1f} MiB)")
        if "overload" in r:
            o = r["overload"]
            print(f"  overload, default limits: {o['rate_limited']} of {o['requests']} requests from "
                  f"{o['clients']} clients got 429")
    if "tokens_per_second_vs_baseline" in result:
        print(f"tokens/s {result['tokens_per_second_vs_baseline']:.2f}x the baseline; "
              f"p95 latency {result['p95_vs_baseline']:.2f}x")


if __name__ == "__main__":
    main()
