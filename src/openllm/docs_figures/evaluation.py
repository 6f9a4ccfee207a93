"""Figures of chapters 5 and 8: each checkpoint's evaluation, surprisal, the bias probe, the budget study."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..checkpoint import TOKENIZER, load_model
from ..paths import METRICS_DIR
from ..fileio import read_json
from .project import LINE, Project, save, table


# --- chapter 5: evaluation --------------------------------------------------------------------


def evaluations(project: Project) -> list[dict]:
    """The evaluate stage's figures of each checkpoint that has them."""
    found = []
    for step, _ in project.checkpoints:
        path = project.root / METRICS_DIR / "evaluate" / f"step-{step}.json"
        if path.is_file():
            found.append(read_json(path))
    return found


def evaluation(project: Project, out: Path) -> None:
    rows = [[f"step-{m['step']}", f"{m['tokens_seen']:,}", f"{m['val_loss']:.3f}", f"{m['val_perplexity']:.1f}",
             f"{m['val_bits_per_byte']:.3f}"] for m in evaluations(project)]
    text = table(["checkpoint", "tokens seen", "loss (nats/token)", "perplexity", "bits per byte"], rows, "lrrrr")
    (out / "evaluation.md").write_text(text, encoding="utf-8")
    samples = []
    for step, _ in (project.checkpoints[0], project.checkpoints[-1]):
        path = project.root / METRICS_DIR / "samples" / f"step-{step}.md"
        if path.is_file():  # the first greedy continuation of the file
            block = path.read_text(encoding="utf-8").split("```text\n", 1)[1].split("\n```", 1)[0]
            samples.append(f"**step-{step}**, greedy:\n\n```text\n{block}\n```\n")
    (out / "samples.md").write_text("\n".join(samples) or "No samples yet.\n", encoding="utf-8")


def surprisal(project: Project, out: Path) -> None:
    """The line's tokens coloured by surprisal under the first and the last checkpoint."""
    from ..inspection import bits_per_byte, token_surprisals

    parts = []
    for index in (0, -1):
        tokens = token_surprisals(project.generator(index), "ROMEO:\n" + LINE)
        spans = []
        for t in tokens:
            bits = 0.0 if t.bits is None else t.bits
            alpha = min(1.0, bits / 16)
            spans.append(f'<span title="{bits:.1f} bits" style="background: rgba(230, 80, 20, {alpha:.2f})">'
                         f"{html.escape(t.text.replace(chr(10), '↵'))}</span>")
        step = project.exports[index][0]
        parts.append(f"<p><b>step-{step}</b> ({bits_per_byte(tokens):.2f} bits per byte): "
                     f"<code>{''.join(spans)}</code></p>")
    (out / "surprisal.md").write_text("\n".join(parts) + "\n", encoding="utf-8")


# --- the bias probe -----------------------------------------------------------------------------


def bias(project: Project, out: Path) -> None:
    import matplotlib.pyplot as plt

    from .. import bias as probe
    from ..tokenizer import load_tokenizer

    gaps = {}
    for step, folder in project.checkpoints:
        model = load_model(folder)
        gaps[step] = probe.pair_gaps(model, load_tokenizer(folder / TOKENIZER))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for n, pair in enumerate(probe.PAIRS):
        ax.plot(list(gaps), [g[n] for g in gaps.values()], color="grey", lw=0.6, alpha=0.6)
    ax.plot(list(gaps), [np.mean(g) for g in gaps.values()], "o-", color="C3", lw=2, label="mean over the pairs")
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="checkpoint step", ylabel="log p(masculine) − log p(feminine), nats",
           title="bias probe: one grey line per minimal pair")
    ax.legend()
    save(fig, out / "bias.png")
    header = ["sentence", "masculine / feminine", *[f"step-{s}" for s in gaps]]
    rows = [[pair.template.replace("{}", "…"), f"{pair.masculine} / {pair.feminine}",
             *[f"{g[n]:+.2f}" for g in gaps.values()]] for n, pair in enumerate(probe.PAIRS)]
    rows.append(["**mean**", "", *[f"**{np.mean(g):+.2f}**" for g in gaps.values()]])
    rows.append(["pairs leaning masculine", "", *[f"{np.mean(np.asarray(g) > 0):.0%}" for g in gaps.values()]])
    (out / "bias.md").write_text(table(header, rows, "ll" + "r" * len(gaps)), encoding="utf-8")


# --- chapter 8: the fixed-budget study -----------------------------------------------------------


def budget(project: Project, out: Path) -> None:
    """The runs of bench/budget.py recorded in bench/results (git-tracked, not regenerated here)."""
    rows = []
    for path in sorted((project.root / "bench" / "results").glob("budget_*.json")):
        run = read_json(path)
        shape, args = run["shape"], run["args"]
        baseline = run.get("char_baseline", {}).get("val_bits_per_byte")
        rows.append([f"{shape['n_layer']} × {shape['n_embd']}", f"{run['parameters']:,}", args["optimizer"],
                     f"{run['train_seconds']:.0f} s", f"{run['steps']:,}", f"{run['val_bits_per_byte']:.3f}",
                     f"{baseline:.3f}" if baseline else "not run"])
    header = ["layers × width", "parameters", "optimizer", "budget", "steps", "bits per byte", "character baseline"]
    text = table(header, rows, "lrlrrrr") if rows else "No recorded runs in `bench/results/budget_*.json`.\n"
    (out / "budget.md").write_text(text, encoding="utf-8")
