"""The benchmark tables: bench/results/*.json -> bench/results/README.md and the README's section.

    python bench/report.py [--readme README.md]

Only the result files that exist are reported. Ratios compare figures measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def training(r: dict) -> list[str]:
    peaks = r["peak_flops"]
    lines = [f"### Training ({r['machine']}, {r['threads']} threads, torch {r['torch']}, {r['date']})", "",
             f"Matmul throughput measured in the same run: bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s, "
             f"fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s. MFU = tokens/s × model FLOPs per token "
             "(6 × parameters + attention) / that throughput.", "",
             "| preset | precision | compiled | optimizer | tokens/s | model GFLOP/s | MFU vs bf16 peak | MFU vs fp32 peak |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for row in r["runs"]:
        label = f"**{row['preset']} (default)**" if row.get("default") else row["preset"]
        lines.append(f"| {label} | {row['precision']} | {'yes' if row['compiled'] else 'no'} | "
                     f"{row.get('optimizer', 'adamw')} | {row['tokens_per_second']:,.0f} | "
                     f"{row['model_gflops_per_second']:,.0f} | {row['mfu_vs_bf16_peak']:.1%} | {row['mfu_vs_fp32_peak']:.1%} |")
    return lines


def pipeline(r: dict) -> list[str]:
    e2e, q = r["end_to_end"], r["quality"]
    o, c = q["openllm"], q["char_baseline"]
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in e2e["stage_seconds"].items())
    lines = [f"### End to end and quality per compute ({r['machine']['processor']}, {r['machine']['cpus']} CPUs, "
             f"{r['date']})", "",
             f"- Default `dvc repro` from a clean state: **{e2e['clean_repro_seconds'] / 60:.1f} min** ({stages}).",
             f"- No-op `dvc repro`: **{e2e['noop_repro_seconds']:.1f} s**.", "",
             "Validation bits per byte in the same run: the baseline trained for the train stage's wall-clock "
             "time, the recipe for its 2,000 iterations:", "",
             "| model | parameters | training | steps | val bits/byte |", "| --- | ---: | ---: | ---: | ---: |",
             f"| OpenLLM `{o.get('preset', 'tiny')}` (BPE {o.get('vocab_size', '')}) step {o['checkpoint']} | {o['parameters']:,} | "
             f"{o['train_seconds']:.0f} s | {o['steps']:,} | {o['val_bits_per_byte']:.3f} |",
             f"| character-level baseline (4 layers, 4 heads, 128 wide, context 64), same time | {c['parameters']:,} | "
             f"{c['train_seconds']:.0f} s | {c['steps']:,} | {c['val_bits_per_byte']:.3f} |"]
    recipe = q.get("nanogpt_recipe")
    if recipe:
        lines.append(f"| the same model by nanoGPT's CPU recipe (2,000 iterations) | {recipe['parameters']:,} | "
                     f"{recipe['train_seconds']:.0f} s | {recipe['steps']:,} | {recipe['val_bits_per_byte']:.3f} |")
    if short := q.get("openllm_at_recipe_time"):
        lines.append(f"| OpenLLM `{o.get('preset', 'tiny')}`, default settings, trained for the recipe's time | "
                     f"{short['parameters']:,} | {short['train_seconds']:.0f} s | {short['steps']:,} | "
                     f"{short['val_bits_per_byte']:.3f} |")
    lines += ["", f"OpenLLM needs {q['bits_per_byte_reduction']:.0%} fewer bits per byte than the baseline given "
                  "the same time" + ("" if not recipe else
                  f", and {q['bits_per_byte_reduction_vs_recipe']:.0%} fewer than nanoGPT's recipe, in "
                  f"{q['train_time_vs_recipe']:.2f}× its training time") + "."
              + ("" if not short else f" Given only the recipe's training time, it needs "
                 f"{q['bits_per_byte_reduction_vs_recipe_same_time']:.0%} fewer.")]
    if "int8" in r:
        i = r["int8"]
        lines += ["", f"int8 export of the final checkpoint (`{o.get('preset', 'tiny')}`): "
                      f"{i['decode_speedup']:.2f}× the fp32 decode speed, "
                      f"bits per byte {i['bits_per_byte_change']:+.4f} ({i['relative_change']:+.2%})."]
    return lines


def heading(title: str, columns: list[str], align: str) -> list[str]:
    """A section's title and its table's header rows; ``align``: one letter per column, l or r."""
    rule = " | ".join("---:" if a == "r" else "---" for a in align)
    return [f"### {title}", "", f"| {' | '.join(columns)} |", f"| {rule} |"]


def generation(r: dict) -> list[str]:
    lines = heading(f"Generation (`{r['preset']}`, {r['parameters']:,} parameters, {r['new_tokens']} new tokens "
                    f"per prompt, greedy, {r['torch_threads']} threads, {r['date']})",
                    ["batch", "way", "tokens/s", "first token", "vs PyTorch without cache"], "rlrrr")
    names = {"torch_no_cache": "PyTorch, no cache", "torch_kv_cache": "PyTorch, KV cache",
             "onnx_fp32": "onnxruntime fp32", "onnx_int8": "onnxruntime int8"}
    for batch, figures in r["batches"].items():
        for name, row in figures["rows"].items():
            lines.append(f"| {batch} | {names[name]} | {row['tokens_per_second']:,.0f} | "
                         f"{row['first_token_ms']:.1f} ms | {row['speedup_vs_torch_no_cache']:.1f}× |")
    one = r["batches"].get("1")
    if one:
        lines += ["", f"At batch 1, onnxruntime fp32 runs {one['onnx_fp32_vs_torch_no_cache']:.1f}× as fast as PyTorch "
                      f"without a cache and {one['onnx_fp32_vs_torch_kv_cache']:.1f}× as fast as PyTorch with one; "
                      f"int8 runs {one['int8_vs_fp32']:.2f}× as fast as fp32."]
    return lines


def tokenizer(r: dict) -> list[str]:
    pool = next(k for k in r if k.startswith("encode_mb_per_second_") and not k.endswith("_1_process"))
    return [f"### Tokenizer (default corpus: {r['documents']} plays, {r['corpus_megabytes']:.1f} MB, "
            f"vocabulary {r['vocab_size']:,})", "",
            f"Training {r['train_seconds']:.1f} s; encoding {r['encode_mb_per_second_1_process']:.1f} MB/s in one "
            f"process, {r[pool]:.1f} MB/s with {r['workers']} worker processes "
            f"({r['bytes_per_token']:.2f} bytes per token)."]


def server(r: dict) -> list[str]:
    lines = [f"### HTTP server (`openllm serve`, {r['clients']} clients × {r['requests'] // r['clients']} requests, "
             f"{r['max_tokens']} tokens each)", "",
             f"{r['errors']} errors in {r['requests']} requests; latency p50 {r['p50_ms']:.0f} ms, p95 "
             f"{r['p95_ms']:.0f} ms; {r['tokens_per_second']:,.0f} tokens/s; server memory "
             f"{r['rss_before_mb']:.0f} MiB before, {r['rss_growth_mb']:+.1f} MiB after."]
    base = r.get("baseline")
    if base:
        lines += ["", f"Against the thread-per-request server of commit `{base['ref']}` (no queue, "
                      "`max_concurrent` raised to the clients), both running, measured in alternating rounds "
                      f"(load average {r.get('load_average_at_end', '?')} at the end: other work shared the cores):", "",
                  "| server | tokens/s | p50 ms | p95 ms | 429s, 16 clients, default limits |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, x in (("cross-request batching", r), (f"thread per request ({base['ref']})", base)):
            o = x["overload"]
            lines.append(f"| {name} | {x['tokens_per_second']:,.0f} | {x['p50_ms']:.0f} | {x['p95_ms']:.0f} | "
                         f"{o['rate_limited']} of {o['requests']} |")
        lines += ["", f"Batching: {r['tokens_per_second_vs_baseline']:.2f}× the tokens/s, "
                      f"{r['p95_vs_baseline']:.2f}× the p95 latency."]
    return lines


def genai(r: dict) -> list[str]:
    lines = heading(f"onnxruntime-genai and `openllm generate` on the same export (`{r['model']}`, greedy to "
                    f"the full context, {r['date']})",
                    ["model", "batch", "engine onnxruntime (tokens/s)", "engine genai (tokens/s)",
                     "onnxruntime-genai alone (tokens/s)", "genai engine / onnxruntime engine",
                     "genai alone / onnxruntime engine"], "lrrrrrr")
    for name, row in r["results"].items():
        variant, batch = name.split("_batch_")
        ours, theirs = row["openllm"]["tokens_per_second"], row["onnxruntime_genai"]["tokens_per_second"]
        engine = row.get("openllm_genai_engine", {}).get("tokens_per_second")
        cells = (f"{engine:,.0f} | {engine / ours:.2f}×" if engine else "– | –").split(" | ")
        lines.append(f"| {variant} | {batch} | {ours:,.0f} | {cells[0]} | {theirs:,.0f} | {cells[1]} | "
                     f"{theirs / ours:.2f}× |")
    return lines


def gpu(r: dict) -> list[str]:
    lines = [f"### GPU ({r['device']}, {r['date']})", "", "| compiled | tokens/s | MFU vs bf16 peak |",
             "| --- | ---: | ---: |"]
    for row in r["runs"]:
        lines.append(f"| {'yes' if row['compiled'] else 'no'} | {row['tokens_per_second']:,.0f} | "
                     f"{row['mfu_vs_bf16_peak']:.1%} |")
    return lines


def render() -> str:
    sections = [("pipeline", pipeline), ("training", training), ("generation", generation), ("genai", genai),
                ("tokenizer", tokenizer), ("server", server), ("gpu", gpu)]
    parts = []
    for name, render_one in sections:
        result = load(name)
        if result is not None:
            parts.append("\n".join(render_one(result)))
    if not parts:
        return "(run `make bench` to fill this section)"
    return ("Generated by `make bench` (bench/report.py from bench/results/*.json); every ratio "
            "compares figures measured in the same run.\n\n" + "\n\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, help="also replace the section between the bench markers")
    args = parser.parse_args()
    markdown = render()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "README.md").write_text("# Benchmark results\n\n" + markdown + "\n", encoding="utf-8")
    if args.readme:
        text = args.readme.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{args.readme}: no {BEGIN} ... {END} markers")
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{markdown}\n{END}",
                      text, flags=re.S)
        args.readme.write_text(text, encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
