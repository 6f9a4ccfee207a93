"""Every figure and number of the documentation, computed from the code and the checkpoints.

``make docs`` runs ``python -m openllm.docs_figures`` and then builds the site, so nothing in
the docs is pasted by hand: the pages include the markdown pieces and PNG charts written here
into ``docs/generated/`` (git-ignored). It reads a project after ``make run``:

- ``models/checkpoints/step-N`` -- the tokenizer, the model shapes, the bias probe;
- ``models/export/step-N`` -- next-token distributions, attention maps, the ONNX interface;
- ``metrics/`` -- the evaluation figures, samples and training curves;
- ``params.yaml`` -- the learning-rate schedule, drawn by the training code's own function.
"""

from __future__ import annotations

import argparse
import html
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import TOKENIZER, list_checkpoints, load_model
from .config import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_DIR, Params, load_params
from .errors import OpenLLMError
from .fileio import read_json

# Romeo and Juliet, act 2, scene 2, as the plays' text spells it.
LINE = "But, soft! what light through yonder window breaks?"
PROMPT = "ROMEO:\nBut, soft! what light through yonder"  # where the sampling chapter looks at the next token
SAMPLING_DRAWS = 20_000


class DocsFiguresError(OpenLLMError):
    """The project has nothing to draw the docs from (no checkpoints, no exports)."""


@dataclass
class Project:
    """What the figures are made from."""

    root: Path
    params: Params
    checkpoints: list[tuple[int, Path]]  # (step, folder), by step
    exports: list[tuple[int, Path]]

    @classmethod
    def open(cls, root: Path) -> Project:
        params = load_params(root / "params.yaml")
        checkpoints = list_checkpoints(root / CHECKPOINTS_DIR)
        exports = list_checkpoints(root / EXPORT_DIR)
        if not checkpoints or not exports:
            raise DocsFiguresError(f"no checkpoints in {root / CHECKPOINTS_DIR} or no exports in {root / EXPORT_DIR}: "
                                   "run `make run` first")
        return cls(root, params, checkpoints, exports)

    def generator(self, index: int = -1):
        from .runtime import OnnxGenerator

        return OnnxGenerator.load(self.exports[index][1])


def table(header: list[str], rows: list[list[object]], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column (l or r), left by default."""
    align = align or "l" * len(header)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def shown(piece: str) -> str:
    """A token as a table cell: spaces and newlines made visible, markdown characters escaped."""
    text = piece.replace(" ", "␣").replace("\n", "↵")
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


# --- chapter 2: tokenization ------------------------------------------------------------------


def tokenization(project: Project, out: Path) -> None:
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(project.checkpoints[-1][1] / TOKENIZER)
    ids = tokenizer.encode(LINE)
    rows = []
    for token in ids:
        piece = tokenizer.id_to_piece(token)
        n_bytes = 1 if tokenizer.is_byte(token) else len(piece.replace("\u2581", " ").encode())
        rows.append([shown(piece.replace("\u2581", " ")), token, n_bytes])
    back = tokenizer.decode(ids)
    text = table(["piece", "id", "bytes"], rows, "lrr")
    text += (f"\n{len(LINE.encode())} bytes became {len(ids)} tokens, {len(LINE.encode()) / len(ids):.2f} bytes "
             f"per token, out of a vocabulary of {tokenizer.vocab_size():,} pieces. Decoding the ids gives the "
             f"line back {'exactly' if back == LINE else 'with differences'}.\n")
    meta_path = project.root / "data" / "tokenized" / "meta.json"
    if meta_path.is_file():
        val = read_json(meta_path)["val"]
        text += (f"\nOver the whole validation split the tokenizer averages "
                 f"{val['bytes'] / val['tokens']:.2f} bytes per token.\n")
    (out / "tokens.md").write_text(text, encoding="utf-8")


# --- chapter 3: the model ---------------------------------------------------------------------


def model_shapes(project: Project, out: Path) -> None:
    model = load_model(project.checkpoints[-1][1])
    c = model.config
    V, C, H, D, I, L, T = (c.vocab_size, c.n_embd, c.n_head, c.head_dim, c.intermediate_size, c.n_layer,
                           c.context_length)
    shapes = table(["step", "tensor", "shape (batch B = 1, T = context)"], [
        ["token ids", "`input_ids`", f"(1, {T})"],
        ["embedding lookup", "`x`", f"(1, {T}, {C})"],
        ["queries, keys, values per head", "`q`, `k`, `v`", f"(1, {H}, {T}, {D})"],
        ["attention scores", "`q @ k.T`", f"(1, {H}, {T}, {T})"],
        ["SwiGLU hidden", "`gate`, `up`", f"(1, {T}, {I})"],
        ["logits", "`lm_head(norm(x))`", f"(1, {T}, {V})"],
    ])
    per_layer = 4 * C * C + 3 * C * I + 2 * C
    counts = [
        ["token embedding (shared with the output head)", f"V × C = {V:,} × {C}", f"{V * C:,}"],
        ["attention, per layer", f"4 × C × C = 4 × {C} × {C}", f"{4 * C * C:,}"],
        ["SwiGLU MLP, per layer", f"3 × C × I = 3 × {C} × {I}", f"{3 * C * I:,}"],
        ["two RMSNorm scales, per layer", f"2 × C", f"{2 * C:,}"],
        [f"all {L} layers", f"{L} × {per_layer:,}", f"{L * per_layer:,}"],
        ["final RMSNorm", "C", f"{C:,}"],
    ]
    total = V * C + L * per_layer + C
    if total != model.num_parameters():
        raise DocsFiguresError(f"the parameter formula gives {total:,}, the model has {model.num_parameters():,}")
    counts.append(["**total**", "", f"**{total:,}**"])
    settings = table(["n_layer", "n_head", "n_embd (C)", "head_dim (D)", "intermediate (I)", "context (T)", "vocab (V)"],
                     [[L, H, C, D, I, T, V]], "rrrrrrr")
    (out / "model_config.md").write_text(settings, encoding="utf-8")
    (out / "model_shapes.md").write_text(shapes, encoding="utf-8")
    (out / "parameters.md").write_text(table(["part", "formula", "parameters"], counts, "llr"), encoding="utf-8")


def presets(project: Project, out: Path) -> None:
    """Every model preset of params.yaml's ``model.preset``, with its parameter count."""
    from .config import MODEL_PRESETS
    from .model import GPT, GPTConfig

    vocab = project.params.tokenizer.vocab_size
    rows = []
    for name, shape in MODEL_PRESETS.items():
        counts = [GPT(GPTConfig(vocab_size=v, **shape)).num_parameters() for v in (vocab, 32_000)]
        rows.append([f"`{name}`", shape["n_layer"], shape["n_head"], shape["n_embd"], shape["intermediate_size"],
                     f"{shape['context_length']:,}", f"{counts[0]:,}", f"{counts[1]:,}"])
    header = ["preset", "layers", "heads", "width", "SwiGLU width", "context",
              f"parameters, {vocab:,} pieces", "parameters, 32,000 pieces"]
    (out / "presets.md").write_text(table(header, rows, "lrrrrrrr"), encoding="utf-8")


# --- chapter 4: training ----------------------------------------------------------------------


def schedule(project: Project, out: Path) -> None:
    import matplotlib.pyplot as plt

    from .schedule import Schedule

    cfg = project.params.train
    plan = Schedule.from_config(cfg)
    steps = np.arange(cfg.max_steps)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [plan.lr(int(s)) for s in steps])
    for step in cfg.checkpoint_steps:
        ax.axvline(step, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title=f"Schedule.lr, train.schedule: {plan.kind}")
    save(fig, out / "learning_rate.png")
    decay = (f"stays there until step {plan.decay_start:,}, then decays linearly" if plan.kind == "wsd"
             else "then follows a cosine")
    text = (f"Your run: warmup over {cfg.warmup_steps} steps up to {cfg.learning_rate:g}; the rate {decay} "
            f"to {cfg.min_learning_rate:g} at step {cfg.max_steps:,}. Checkpoints (dotted) at steps "
            f"{', '.join(f'{s:,}' for s in cfg.checkpoint_steps)}. Optimizer `{cfg.optimizer}`, "
            f"{cfg.batch_size} sequences of {project_context(project):,} tokens per step, weight decay "
            f"{cfg.weight_decay:g}.\n")
    (out / "schedule.md").write_text(text, encoding="utf-8")


def project_context(project: Project) -> int:
    return int(read_json(project.checkpoints[-1][1] / "config.json")["context_length"])


def training_curves(project: Project, out: Path) -> None:
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(7, 3.2))
    steps_path, evals_path = project.root / METRICS_DIR / "train_steps.tsv", project.root / METRICS_DIR / "train_evals.tsv"
    if steps_path.is_file():
        steps = pd.read_csv(steps_path, sep="\t")
        ax.plot(steps["step"], steps["train_loss"], lw=0.6, alpha=0.6, label="training batches")
    if evals_path.is_file():
        evals = pd.read_csv(evals_path, sep="\t")
        ax.plot(evals["step"], evals["val_loss"], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="metrics/train_*.tsv")
    ax.legend()
    save(fig, out / "training_curves.png")


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
    surprisal(project, out)


def surprisal(project: Project, out: Path) -> None:
    """The line's tokens coloured by surprisal under the first and the last checkpoint."""
    from .inspection import bits_per_byte, token_surprisals

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


# --- chapter 6: sampling ----------------------------------------------------------------------


def sampling(project: Project, out: Path) -> None:
    """How often each token is drawn after PROMPT by the real sampler, for four settings."""
    import matplotlib.pyplot as plt

    from .inspection import log_probabilities, piece_text
    from .sampling import Sampling, sample_next

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

    from .inspection import ATTENTION_FILE

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

    from .inspection import AttentionModel, piece_text

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


# --- the bias probe -----------------------------------------------------------------------------


def bias(project: Project, out: Path) -> None:
    import matplotlib.pyplot as plt

    from . import bias as probe
    from .tokenizer import load_tokenizer

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


# --- the command ------------------------------------------------------------------------------

FIGURES = (tokenization, model_shapes, presets, schedule, training_curves, evaluation, sampling, export_facts, attention, bias,
           budget)


def generate(root: Path, out: Path) -> list[str]:
    """Write every figure and number of the docs into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    project = Project.open(root)
    out.mkdir(parents=True, exist_ok=True)
    for make in FIGURES:
        make(project, out)
    return sorted(p.name for p in out.iterdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openllm.docs_figures", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project folder (default: here)")
    parser.add_argument("--out", type=Path, default=Path("docs/generated"), help="where to write (default: docs/generated)")
    args = parser.parse_args(argv)
    try:
        written = generate(args.root, args.out)
    except OpenLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(written)} files in {args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
