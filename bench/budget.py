"""Quality for a fixed wall-clock budget: the experiments behind README "Choosing the defaults".

Trains one model shape (a preset plus overrides) on the tokenized default data for a fixed
number of seconds, with OpenLLM's model and optimizers, bf16 autocast, and a warmup + cosine
schedule fitted to the budget from the speed of the first steps (compilation time counts
against the budget). Then scores 256 evenly spaced validation windows and prints one JSON line.
``--baseline`` also trains the character-level baseline (bench/char_baseline.py) for the same
time and scores it on the whole validation text.

    python bench/budget.py --seconds 540 --compile [--preset micro] [--n-embd 192] [--optimizer adamw]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from char_baseline import CharConfig, bits_per_byte, train_for
from openllm.config import MODEL_PRESETS
from openllm.data import iter_documents
from openllm.fileio import read_json
from openllm.model import GPT, GPTConfig
from openllm.tokenizer import load_tokens


def windows(tokens: np.ndarray, starts, context: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([tokens[s : s + context + 1].astype(np.int64) for s in starts]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=270.0)
    parser.add_argument("--data", type=Path, default=Path("data/tokenized"))
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="micro")
    for field in ("n_layer", "n_head", "n_embd", "intermediate_size", "context_length"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    parser.add_argument("--learning-rate", type=float, default=0.004)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="also train the character-level baseline")
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    if not (args.data / "meta.json").is_file():
        parser.error(f"{args.data / 'meta.json'} not found: run `dvc repro tokenize` first (or pass --data)")

    meta = read_json(args.data / "meta.json")
    train, val = load_tokens(args.data, "train"), load_tokens(args.data, "val")
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in MODEL_PRESETS[args.preset].items()}
    torch.manual_seed(1337)
    try:
        config = GPTConfig(vocab_size=meta["vocab_size"], **shape)
    except ValueError as error:
        parser.error(f"model shape: {error}")
    model = GPT(config).train()
    optimizer = model.configure_optimizer(args.weight_decay, args.learning_rate, (0.9, 0.95), kind=args.optimizer)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    forward = torch.compile(model) if args.compile else model
    context, generator = shape["context_length"], torch.Generator().manual_seed(1)

    started, step, planned = time.perf_counter(), 0, None
    while time.perf_counter() - started < args.seconds:
        if step == args.warmup_steps + 10:  # speed measured over 30 steps after warmup and compiling
            mark = time.perf_counter()
        if step == args.warmup_steps + 40:
            per_step = (time.perf_counter() - mark) / 30
            planned = step + int((args.seconds - (time.perf_counter() - started)) / per_step)
        if step < args.warmup_steps:
            scale = (step + 1) / args.warmup_steps
        else:
            progress = 0.0 if planned is None else min(1.0, (step - args.warmup_steps) / (planned - args.warmup_steps))
            scale = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * scale
        starts = torch.randint(0, len(train) - context - 1, (args.batch_size,), generator=generator).tolist()
        batch = windows(train, starts, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = forward(batch[:, :-1], use_cache=False)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    train_seconds = time.perf_counter() - started

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in np.array_split(np.linspace(0, len(val) - context - 1, 256).astype(int), 32):
            batch = windows(val, chunk, context)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, _ = model(batch[:, :-1], use_cache=False)
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "shape": shape,
        "parameters": model.num_parameters(), "steps": step, "tokens": step * args.batch_size * context,
        "train_seconds": round(train_seconds, 1),
        "val_bits_per_byte": total / count / math.log(2) / meta["bytes_per_token"]["val"],
    }
    if args.baseline:
        raw = args.data.parent / "raw"
        train_text = "\n".join(iter_documents(raw / "train.jsonl"))
        val_text = "\n".join(iter_documents(raw / "val.jsonl"))
        char_model, char_data, char_steps = train_for(args.seconds, train_text)
        result["char_baseline"] = {"steps": char_steps, "val_bits_per_byte":
                                   bits_per_byte(char_model, char_data, val_text, CharConfig().context)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
