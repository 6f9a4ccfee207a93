"""onnxruntime-genai against our generator on the same export: greedy tokens/s at batch 1 and 8.

    python bench/genai.py --out bench/results/genai.json
    python bench/genai.py --export models/export/step-2400   # an export of your own

Without ``--export`` it builds the ``tiny`` shape with random weights (speed does not depend on
the values) and exports it: fp32, int8 and the onnxruntime-genai configs (bench/random_export.py).
Each way generates greedily from one-token prompts until the context is full, for fp32 and int8:

- ``openllm``: :class:`openllm.runtime.OnnxGenerator` (what ``openllm generate``, the server and
  the app run by default), sampling in numpy between onnxruntime calls, a batch in one call;
- ``openllm_genai_engine``: the same with ``engine="genai"`` (``--engine genai``,
  ``serve.engine``, ``app.engine``): one onnxruntime-genai generator per row, stepped in turn;
- ``onnxruntime_genai``: ``onnxruntime_genai.Generator`` on the same ONNX file, the whole batch in
  one generator, greedy search in C++.

Both check that they produce the same tokens first. The figures are new tokens per second
over all prompts of a batch, best of ``--repeats`` runs taken in turns.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from openllm.config import MODEL_PRESETS
from openllm.fileio import write_json
from openllm.genai import INT8_DIR, genai_greedy
from openllm.perf import cpu_name
from openllm.runtime import OnnxGenerator
from openllm.sampling import Sampling
from random_export import random_export


def genai_batch(model, prompts: list[list[int]], max_length: int) -> int:
    """Greedy search over a batch with onnxruntime-genai; returns the new tokens written."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(prompts)
    while not generator.is_done():
        generator.generate_next_token()
    return sum(len(generator.get_sequence(i)) - len(p) for i, p in enumerate(prompts))


def measure(ways: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Tokens per second of each way's fastest run, after a warm-up; the ways take turns."""
    rows = {name: {"tokens_per_second": 0.0, "new_tokens": run()} for name, run in ways.items()}
    for _ in range(repeats):
        for name, run in ways.items():
            started = time.perf_counter()
            tokens = run()
            rows[name].update(tokens_per_second=max(tokens / (time.perf_counter() - started),
                                                    rows[name]["tokens_per_second"]), new_tokens=tokens)
    return rows


def compare(export_dir: Path, batches: list[int], repeats: int) -> dict:
    import onnxruntime_genai as og

    results = {}
    for variant, folder in (("fp32", export_dir), ("int8", export_dir / INT8_DIR)):
        ours = OnnxGenerator.load(export_dir, quantized=variant == "int8")
        engine = OnnxGenerator.load(export_dir, quantized=variant == "int8", engine="genai")
        genai = og.Model(str(folder))
        n = ours.context_length - 1
        greedy = Sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=n, seed=0)
        first = ours.generate_tokens([[400]], greedy)[0].token_ids
        same = engine.generate_tokens([[400]], greedy)[0].token_ids == first
        if genai_greedy(genai, [400], n, ours.eos_id) != first or not same:
            raise SystemExit(f"{folder}: onnxruntime-genai and openllm disagree on the greedy tokens")
        for batch in batches:
            prompts = [[400 + i] for i in range(batch)]  # different prompts, same length
            ways = {
                "openllm": lambda p=prompts: sum(r.completion_tokens for r in ours.generate_tokens(p, greedy)),
                "openllm_genai_engine": lambda p=prompts: sum(
                    r.completion_tokens for r in engine.generate_tokens(p, greedy)),
                "onnxruntime_genai": lambda p=prompts: genai_batch(genai, p, ours.context_length),
            }
            results[f"{variant}_batch_{batch}"] = measure(ways, repeats)
            line = ", ".join(f"{k} {v['tokens_per_second']:,.0f} tokens/s" for k, v in results[f"{variant}_batch_{batch}"].items())
            print(f"{variant} batch {batch}: {line}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/genai.json"))
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--export", type=Path, help="an export folder to measure instead of a random model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="openllm-bench-") as tmp:
        export_dir = args.export or random_export(Path(tmp), args.preset)[1]
        figures = compare(export_dir, args.batches, args.repeats)
    write_json(args.out, {
        "model": str(args.export) if args.export else args.preset, "results": figures,
        "cpu": cpu_name(), "cpus": torch.get_num_threads(), "python": platform.python_version(),
        "onnxruntime": version("onnxruntime"), "onnxruntime_genai": version("onnxruntime-genai"),
        "date": time.strftime("%Y-%m-%d"),
    })
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
