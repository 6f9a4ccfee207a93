"""Quality for a fixed wall-clock budget: the experiments behind README "Choosing the defaults".

Trains one model shape (a preset plus overrides) on the tokenized default data for a fixed
number of seconds with the train stage's own pieces (optimizers, precision, torch.compile,
window sampler, warmup + cosine schedule), the schedule's length fitted to the budget from the
speed of the first steps (compilation time counts against the budget). Then scores 256 evenly
spaced validation windows, as the train stage's evaluations do, and prints one JSON line.
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

import pydantic
import torch

from char_baseline import train_and_score
from openllm.config import MODEL_PRESETS, TrainConfig
from openllm.fileio import read_json
from openllm.model import GPT, GPTConfig
from openllm.tokenizer import load_tokens
from openllm.device import compile_model, resolve_device
from openllm.optim import build_optimizer
from openllm.schedule import Schedule
from openllm.train import train_step
from openllm.windows import WindowSampler, validation_loss

EVAL_BATCHES, EVAL_BATCH_SIZE = 32, 8  # 256 windows


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
    parser.add_argument("--schedule", choices=["wsd", "cosine"], default="wsd")
    parser.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: share of the steps spent decaying")
    parser.add_argument("--baseline", action="store_true", help="also train the character-level baseline")
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    if not (args.data / "meta.json").is_file():
        parser.error(f"{args.data / 'meta.json'} not found: run `dvc repro tokenize` first (or pass --data)")

    try:
        cfg = TrainConfig(learning_rate=args.learning_rate, min_learning_rate=args.learning_rate * args.min_lr_ratio,
                          batch_size=args.batch_size, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                          optimizer=args.optimizer, compile="true" if args.compile else "false",
                          schedule=args.schedule, decay_fraction=args.decay_fraction)
    except pydantic.ValidationError as error:
        parser.error(str(error))
    meta = read_json(args.data / "meta.json")
    train, val = load_tokens(args.data, "train"), load_tokens(args.data, "val")
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in MODEL_PRESETS[args.preset].items()}
    torch.manual_seed(1337)
    try:
        config = GPTConfig(vocab_size=meta["vocab_size"], **shape)
    except ValueError as error:
        parser.error(f"model shape: {error}")
    runtime = resolve_device(cfg.device, cfg.precision, cfg.compile, cfg.deterministic, distributed=False)
    model = GPT(config).to(runtime.device).train()
    optimizer = build_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    sampler, context = WindowSampler(train, config.context_length, seed=1), config.context_length

    started, step = time.perf_counter(), 0
    schedule = Schedule.from_config(cfg.model_copy(update={"max_steps": 10**9}))  # the peak until the speed is known
    forward = model
    if runtime.compile:
        forward = compile_model(model, sampler.batch(torch.tensor([0]), runtime.device)[0], runtime, required=True)
    while time.perf_counter() - started < args.seconds:
        if step == cfg.warmup_steps + 10:  # speed measured over 30 steps after warmup and compiling
            mark = time.perf_counter()
        if step == cfg.warmup_steps + 40:
            per_step = (time.perf_counter() - mark) / 30
            planned = step + int((args.seconds - (time.perf_counter() - started)) / per_step)
            schedule = Schedule.from_config(cfg.model_copy(update={"max_steps": planned}))
        batch = sampler.batch(sampler.next_starts(cfg.batch_size), runtime.device)
        train_step(forward, model, optimizer, [batch], schedule.lr(step), cfg.grad_clip, runtime)
        step += 1
    train_seconds = time.perf_counter() - started

    val_loss = validation_loss(model, val, context, EVAL_BATCHES, EVAL_BATCH_SIZE, runtime)
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "shape": shape,
        "parameters": model.num_parameters(), "steps": step, "tokens": step * cfg.batch_size * context,
        "train_seconds": round(train_seconds, 1),
        "val_bits_per_byte": val_loss / math.log(2) / meta["bytes_per_token"]["val"],
    }
    if args.baseline:
        result["char_baseline"] = train_and_score(args.seconds, args.data.parent / "raw")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
