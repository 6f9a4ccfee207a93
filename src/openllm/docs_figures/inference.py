"""Figures of chapters 6 and 7 and the app, made by running the last export: sampling, the ONNX interface, attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import read_json
from .project import LINE, PROMPT, Project, save, shown, table

SAMPLING_DRAWS = 20_000


# --- chapter 6: sampling ----------------------------------------------------------------------


def sampling(project: Project, out: Path) -> None:
    """How often each token is drawn after PROMPT by the real sampler, for four settings."""
    import matplotlib.pyplot as plt

    from ..inspection import log_probabilities, piece_text
    from ..sampling import Sampling, sample_next

    generator = project.generator()
    ids = generator.encode(PROMPT)
    logits = log_probabilities(generator, ids)[-1]
    top = np.argsort(-logits, kind="stable")[:12]
    settings = {"temperature 1": Sampling(temperature=1.0, top_k=0, top_p=1.0),
                "temperature 0.5": Sampling(temperature=0.5, top_k=0, top_p=1.0),
                "temperature 1, top-k 5": Sampling(temperature=1.0, top_k=5, top_p=1.0),
                "temperature 1, top-p 0.5": Sampling(temperature=1.0, top_k=0, top_p=0.5)}
    batch = np.broadcast_to(logits, (SAMPLING_DRAWS, len(logits)))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(settings)
    rows = []
    for n, (name, setting) in enumerate(settings.items()):
        drawn = sample_next(batch, setting, np.random.default_rng(0))
        share = np.bincount(drawn, minlength=len(logits)) / SAMPLING_DRAWS
        ax.bar(np.arange(len(top)) + n * width, share[top], width, label=name)
        rows.append([name, len(np.unique(drawn)), f"{share[top[0]]:.0%}"])
    labels = [shown(piece_text(generator.tokenizer, int(i))).strip("`") for i in top]
    ax.set_xticks(np.arange(len(top)) + 0.4 - width / 2, labels, rotation=45, ha="right")
    ax.set(ylabel="share of draws", title=f"next token after {PROMPT[-24:]!r} (step-{project.exports[-1][0]})")
    ax.legend(fontsize=8)
    save(fig, out / "sampling.png")
    probs = np.exp(logits[top])
    text = table(["token", "probability"], [[shown(piece_text(generator.tokenizer, int(i))), f"{p:.3f}"]
                                            for i, p in zip(top[:8], probs[:8])], "lr")
    text += "\n" + table(["setting", f"different tokens in {SAMPLING_DRAWS:,} draws", "share of the top token"],
                         rows, "lrr")
    (out / "sampling.md").write_text(text, encoding="utf-8")


# --- chapter 7: export ------------------------------------------------------------------------


def export_facts(project: Project, out: Path) -> None:
    import onnx

    from ..inspection import ATTENTION_FILE

    folder = project.exports[-1][1]
    config = read_json(folder / "config.json")
    graph = onnx.load(str(folder / config["files"]["model"]), load_external_data=False).graph

    def dims(value) -> str:
        return "(" + ", ".join(d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim) + ")"

    n = config["n_layer"]
    rows = [[f"input `{v.name}`", dims(v)] for v in graph.input[:4]]
    rows += [[f"… {2 * n} cache inputs, up to `{graph.input[-1].name}`", dims(graph.input[-1])]]
    rows += [[f"output `{v.name}`", dims(v)] for v in graph.output[:2]]
    rows += [[f"… {2 * n} cache outputs, up to `{graph.output[-1].name}`", dims(graph.output[-1])]]
    text = table(["tensor", "shape"], rows)
    report = read_json(folder / "export.json") if (folder / "export.json").is_file() else {}
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.suffix == ".onnx" or p.name == "tokenizer.model"}  # the models, wherever the export puts them
    text += "\n" + table(["file", "size"], [[f"`{k}`", f"{v / 1e6:.2f} MB"] for k, v in sizes.items()], "lr")
    check = report.get("verification", {})
    if check:
        text += (f"\nThe export of step-{project.exports[-1][0]} was checked against PyTorch: logits within "
                 f"{check['max_abs_diff_logits']:.1e} over a prompt and {check['decode_steps_compared']} cached "
                 f"steps, and the same {check['greedy_tokens_equal']} greedy tokens.\n")
    if "int8" in report:
        q = report["int8"]
        text += (f"\nThe int8 model scores {q['bits_per_byte_int8']:.4f} bits per byte where the fp32 one scores "
                 f"{q['bits_per_byte_fp32']:.4f} ({q['perplexity_change_percent']:+.2f}% perplexity)")
        speedup = q.get("decode_speedup")  # speeds are machine facts: recent exports leave them out
        text += f", and decodes {speedup:.2f}× as fast.\n" if speedup else ".\n"
    if ATTENTION_FILE not in sizes:
        text += f"\n`{ATTENTION_FILE}` is missing: this export predates the Inspect page.\n"
    (out / "export.md").write_text(text, encoding="utf-8")


# --- the app: attention -------------------------------------------------------------------------


def attention(project: Project, out: Path) -> None:
    import matplotlib.pyplot as plt

    from ..inspection import AttentionModel, piece_text

    generator = project.generator()
    ids = generator.encode(LINE)[:14]
    maps = AttentionModel(project.exports[-1][1]).attention(ids)  # (layers, heads, T, T)
    layers, heads = maps.shape[:2]
    labels = [shown(piece_text(generator.tokenizer, i)).strip("`") for i in ids]
    fig, axes = plt.subplots(layers, heads, figsize=(2.1 * heads, 2.1 * layers), squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head], cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks(range(len(ids)) if head == 0 else [], labels if head == 0 else [], fontsize=6)
            ax.set_title(f"layer {layer}, head {head}", fontsize=7)
    save(fig, out / "attention.png")
