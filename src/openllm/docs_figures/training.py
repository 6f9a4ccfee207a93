"""Figures of chapters 2 to 4: the tokenizer, the model's shapes and size, the schedule and the curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import TOKENIZER, load_model
from ..paths import METRICS_DIR
from ..fileio import read_json
from .project import LINE, DocsFiguresError, Project, save, shown, table


# --- chapter 2: tokenization ------------------------------------------------------------------


def tokenization(project: Project, out: Path) -> None:
    from ..tokenizer import load_tokenizer

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
        ["two RMSNorm scales, per layer", "2 × C", f"{2 * C:,}"],
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
    from ..config import MODEL_PRESETS
    from ..model import GPT, GPTConfig

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

    from ..schedule import Schedule

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
