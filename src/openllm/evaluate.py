"""The ``evaluate`` stage: figures for one checkpoint over the whole validation split.

Loss (nats/token), perplexity and bits per byte, computed as :mod:`openllm.scoring` defines
them: the split is cut into consecutive windows of ``context_length`` tokens and every token
but the first is predicted exactly once, from the tokens before it in its window.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .bias import bias_metrics
from .config import EvaluateConfig
from .errors import OpenLLMError
from .fileio import read_json, write_json
from .model import GPT
from .device import resolve_device
from .scoring import language_metrics, sliding_windows
from .tokenizer import load_tokenizer
from .torch_generate import generate_text


class EvaluationError(OpenLLMError, ValueError):
    """The evaluation input (text, tokens, model) is unusable."""


@torch.no_grad()
def token_nats(model: GPT, tokens: np.ndarray, batch_size: int = 8,
               on_progress=lambda n: None, stride: int | None = None) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of ``tokens[1:]`` and how many tokens that is.

    Windows of the model's context every ``stride`` tokens (default: the context, so windows do
    not overlap); see :func:`openllm.scoring.sliding_windows`.
    """
    if len(tokens) < 2:
        raise EvaluationError("need at least 2 tokens to score (the first one has no context)")
    device = next(model.parameters()).device
    context = model.config.context_length
    total, count = 0.0, 0
    for length, skip, batch in sliding_windows(len(tokens), context, stride or context, batch_size):
        window = np.stack([tokens[s : s + length + 1] for s in batch]).astype(np.int64)
        window = torch.from_numpy(window).to(device)
        logits, _ = model(window[:, :-1], use_cache=False)
        targets = window[:, 1 + skip:].flatten()
        total += F.cross_entropy(logits[:, skip:].flatten(0, 1).double(), targets, reduction="sum").item()
        count += targets.numel()
        on_progress(targets.numel())
    return total, count


def score_text(checkpoint_dir: Path, text: str) -> dict[str, float]:
    """Loss, perplexity and bits per byte of ``text`` under a PyTorch checkpoint."""
    model = ckpt.load_model(checkpoint_dir)
    ids = load_tokenizer(checkpoint_dir / ckpt.TOKENIZER).encode(text)
    if len(ids) < 2:
        raise EvaluationError("the text is too short to score (it needs at least 2 tokens)")
    total, count = token_nats(model, np.asarray(ids, np.int64))
    return language_metrics(total, count, len(text.encode("utf-8")))


def write_samples(model: GPT, tokenizer, cfg: EvaluateConfig, step: int, path: Path) -> str:
    """Greedy and seeded-sampling continuations of each prompt, as a markdown file."""
    sampled = cfg.sampling
    greedy = sampled.replace(temperature=0.0)
    parts = [f"# Samples from step {step}\n",
             f"Sampling: temperature {sampled.temperature}, top-k {sampled.top_k}, top-p {sampled.top_p}, "
             f"seed {sampled.seed}, {sampled.max_new_tokens} new tokens.\n"]
    for prompt in cfg.prompts:
        parts.append(f"## Prompt: {prompt.strip()!r}\n")
        for title, settings in (("Greedy", greedy), ("Sampled", sampled)):
            text = prompt + generate_text(model, tokenizer, prompt, settings)
            parts.append(f"**{title}**\n\n```text\n{text}\n```\n")
    markdown = "\n".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown, encoding="utf-8")
    return markdown


def evaluate_checkpoint(checkpoint_dir: Path, tokenized_dir: Path, cfg: EvaluateConfig, metrics_path: Path,
                        samples_path: Path, progress: bool = False) -> tuple[dict[str, Any], dict[str, float]]:
    """Evaluate one checkpoint on the validation split; write its metrics and samples.

    Returns the written figures, and the timings (which go to MLflow only: they differ between runs).
    """
    from tqdm import tqdm

    setup = resolve_device(cfg.device, cfg.precision, deterministic=True, distributed=False)
    model = ckpt.load_model(checkpoint_dir, setup.device)  # verifies sha256
    meta = ckpt.CheckpointMeta.read(checkpoint_dir)
    data_meta = read_json(tokenized_dir / "meta.json")
    if data_meta["tokenizer_sha256"] != meta.tokenizer_sha256:
        raise EvaluationError(f"{checkpoint_dir} was trained with another tokenizer than {tokenized_dir}")
    tokenizer = load_tokenizer(checkpoint_dir / ckpt.TOKENIZER)
    tokens = np.memmap(tokenized_dir / data_meta["val"]["file"], dtype=np.dtype(data_meta["dtype"]), mode="r")
    text_bytes = data_meta["val"]["bytes"]
    if cfg.max_tokens is not None and cfg.max_tokens < len(tokens):  # a quick look: the split's start
        tokens = np.asarray(tokens[: cfg.max_tokens])
        text_bytes = len(tokenizer.decode(tokens.tolist()).encode("utf-8"))
    context = model.config.context_length
    stride = max(1, round(context * cfg.sliding_stride)) if cfg.sliding_stride else None
    started = time.perf_counter()
    with (tqdm(total=(len(tokens) - 1) * (2 if stride else 1), unit="tok", desc=f"evaluate {checkpoint_dir.name}",
               disable=not progress) as bar, setup.autocast()):
        total, count = token_nats(model, tokens, cfg.batch_size, bar.update)
        sliding = token_nats(model, tokens, cfg.batch_size, bar.update, stride)[0] if stride else None
    seconds = time.perf_counter() - started
    figures = language_metrics(total, count, text_bytes)
    first = "" if cfg.max_tokens is None else f", first {len(tokens):,} tokens"
    metrics = {
        "step": meta.step,
        "tokens_seen": meta.tokens_seen,
        "parameters": model.num_parameters(),
        "context_length": model.config.context_length,
        "val_loss": figures["loss"],
        "val_perplexity": figures["perplexity"],
        "val_bits_per_byte": figures["bits_per_byte"],
        "val_tokens": figures["tokens"],
        "val_bytes": figures["bytes"],
        "val_protocol": f"consecutive windows of {context} tokens, stride {context}{first}",
        **({} if stride is None else {
            "val_bits_per_byte_sliding": language_metrics(sliding, count, text_bytes)["bits_per_byte"],
            "val_sliding_protocol": f"windows of {context} tokens, stride {stride}: every token scored once, "
                                    f"with at least {context - stride} tokens before it{first}",
        }),
        "eval_precision": setup.precision_name,
        **bias_metrics(model, tokenizer),  # src/openllm/bias.py
    }
    write_samples(model, tokenizer, cfg, meta.step, samples_path)
    write_json(metrics_path, metrics)
    return metrics, {"eval_tokens_per_second": count / seconds}


def log_to_mlflow(experiment: str, checkpoints_dir: Path, metrics: dict[str, Any], samples_path: Path) -> None:
    """Add the checkpoint's figures (step = checkpoint step) and samples to its training run."""
    from . import tracking

    run_id = tracking.read_run_id(checkpoints_dir)
    if not run_id:
        return
    names = {"val_loss": "eval_val_loss", "val_perplexity": "eval_val_perplexity",
             "val_bits_per_byte": "eval_val_bits_per_byte", "eval_tokens_per_second": "eval_tokens_per_second"}
    mlflow = tracking.setup(experiment)
    with tracking.open_run(mlflow, run_id):
        mlflow.log_metrics({name: metrics[key] for key, name in names.items() if key in metrics}, step=metrics["step"])
        mlflow.log_artifact(str(samples_path), "samples")
