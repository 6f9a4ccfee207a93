"""Generation speed at batch 1 and 8: PyTorch without and with a KV cache, onnxruntime fp32 and int8.

    python bench/generation.py --out bench/results/generation.json

Builds the default ``tiny`` shape with random weights and exports it (bench/random_export.py:
speed does not depend on the values, and the ONNX files are the ones users get). Then each way
generates greedily from a one-token prompt until the context is full (255 new tokens for a
256-token context), for one prompt and for a batch of 8:

- ``torch_no_cache``: every step runs the model over the whole sequence so far;
- ``torch_kv_cache``: the model's KV cache through the decode loop of :mod:`openllm.decode` and
  the PyTorch adapter of :mod:`openllm.torch_generate` (prefill once, one token per step), greedy;
- ``onnx_fp32`` / ``onnx_int8``: :class:`openllm.runtime.OnnxGenerator` with ``model.onnx`` /
  ``model.int8.onnx``.

Prints a table and writes the figures as JSON: new tokens per second over all prompts of the
batch, and the time to the first new token. The best of ``--repeats`` runs is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from openllm.config import MODEL_PRESETS
from openllm.decode import DecodeBatch, Row
from openllm.fileio import write_json
from openllm.model import GPT
from openllm.perf import cpu_name
from openllm.runtime import OnnxGenerator
from openllm.sampling import Sampling
from openllm.torch_generate import torch_forward
from random_export import VOCAB, random_export

@torch.no_grad()
def torch_no_cache(model: GPT, prompts: list[list[int]], n: int) -> tuple[int, float]:
    """Greedy decoding that recomputes the whole prefix at every step: (new tokens, first-token s)."""
    started = time.perf_counter()
    ids, first = torch.tensor(prompts), 0.0
    for i in range(n):
        logits, _ = model(ids, use_cache=False)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        first = first or time.perf_counter() - started
    return n * len(prompts), first


def torch_kv_cache(model: GPT, prompts: list[list[int]], n: int) -> tuple[int, float]:
    """Greedy decoding with the model's KV cache through the decode loop, as generate_ids runs it
    (prefill once, then one token per step). Returns (new tokens, seconds to the first one)."""
    greedy = Sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=n, seed=0)
    rows = [Row(list(prompt), greedy) for prompt in prompts]
    DecodeBatch(torch_forward(model), model.config.context_length, None).run(rows)
    return sum(len(row.tokens) for row in rows), min(row.first_token_seconds for row in rows)


def measure(ways: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Tokens per second and first-token time of each way's fastest run, after a warm-up run.

    The ways take turns within every repeat, so a burst of load from elsewhere on the
    machine slows all of them rather than one.
    """
    rows = {name: {"tokens_per_second": 0.0, "new_tokens": run()[0], "first_token_ms": float("inf")}
            for name, run in ways.items()}
    for _ in range(repeats):
        for name, run in ways.items():
            started = time.perf_counter()
            tokens, first = run()
            rate = tokens / (time.perf_counter() - started)
            row = rows[name]
            row.update(tokens_per_second=max(rate, row["tokens_per_second"]), new_tokens=tokens,
                       first_token_ms=min(row["first_token_ms"], 1000 * first))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/generation.json"))
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="prompts per run")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for PyTorch and onnxruntime (0 = their default)")
    parser.add_argument("--workdir", type=Path, help="keep the tokenizer and exports here (default: a temp folder)")
    return parser.parse_args()


def onnx_way(generator: OnnxGenerator, prompts: list[list[int]], greedy: Sampling):
    """A run of ``generator`` over ``prompts``: (new tokens, seconds to the first one)."""
    def run() -> tuple[int, float]:
        results = generator.generate_tokens(prompts, greedy)
        return sum(r.completion_tokens for r in results), results[0].time_to_first_token  # may stop at EOS
    return run


def compare_batch(model: GPT, onnx: dict[str, OnnxGenerator], batch: int, greedy: Sampling, repeats: int) -> dict:
    """The four ways on ``batch`` one-token prompts: their rows and the ratios the README quotes."""
    prompts = [[400 + i] for i in range(batch)]  # different prompts, same length
    n = greedy.max_new_tokens
    ways = {
        "torch_no_cache": lambda: torch_no_cache(model, prompts, n),
        "torch_kv_cache": lambda: torch_kv_cache(model, prompts, n),
        "onnx_fp32": onnx_way(onnx["fp32"], prompts, greedy),
        "onnx_int8": onnx_way(onnx["int8"], prompts, greedy),
    }
    rows = measure(ways, repeats)
    base = rows["torch_no_cache"]["tokens_per_second"]
    for row in rows.values():
        row["speedup_vs_torch_no_cache"] = row["tokens_per_second"] / base
    return {
        "rows": rows,
        "int8_vs_fp32": rows["onnx_int8"]["tokens_per_second"] / rows["onnx_fp32"]["tokens_per_second"],
        "onnx_fp32_vs_torch_kv_cache":
            rows["onnx_fp32"]["tokens_per_second"] / rows["torch_kv_cache"]["tokens_per_second"],
        "onnx_fp32_vs_torch_no_cache": rows["onnx_fp32"]["speedup_vs_torch_no_cache"],
    }


def print_table(result: dict) -> None:
    print(f"{result['preset']} model ({result['parameters']:,} parameters), {result['new_tokens']} new tokens "
          "per prompt, greedy")
    print(f"{'batch':>5} {'way':<16} {'tokens/s':>10} {'first ms':>9} {'vs no cache':>12}")
    for batch, figures in result["batches"].items():
        for name, row in figures["rows"].items():
            print(f"{batch:>5} {name:<16} {row['tokens_per_second']:>10.1f} {row['first_token_ms']:>9.1f} "
                  f"{row['speedup_vs_torch_no_cache']:>11.2f}x")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="openllm-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model, export_dir = random_export(workdir, args.preset)
        context = model.config.context_length
        prompt = [400]  # one ordinary token; the rest of the context is generated
        n = context - len(prompt)
        greedy = Sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=n, seed=0)
        onnx = {"fp32": OnnxGenerator.load(export_dir, threads=args.threads),
                "int8": OnnxGenerator.load(export_dir, quantized=True, threads=args.threads)}
        batches = {str(batch): compare_batch(model, onnx, batch, greedy, args.repeats) for batch in args.batches}
        result = {
            "preset": args.preset, "vocab_size": VOCAB, "context_length": context, "new_tokens": n,
            "prompt_tokens": len(prompt), "parameters": model.num_parameters(), "batches": batches,
            "threads": args.threads or "default", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.platform(), "processor": cpu_name(),
            "versions": {p: version(p) for p in ("torch", "onnxruntime", "onnx", "numpy")},
            "date": time.strftime("%Y-%m-%d"),
        }

    print_table(result)
    write_json(args.out, result, sort_keys=False)  # keep the order the report prints


if __name__ == "__main__":
    main()
