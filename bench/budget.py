"""Quality for a fixed wall-clock budget: the experiments behind README "Choosing the defaults".

Trains one model shape (a preset plus overrides) on the tokenized default data for a fixed
number of seconds with the budget study's cell trainer (openllm.study.CellTrainer: the train
stage's optimizers, precision, torch.compile, window sampler and schedule), the schedule's
length fitted to the budget from the speed of the first steps (compilation time counts against
the budget). Then scores it as the study and the evaluate stage do (consecutive windows of the
context length over the whole validation split; the protocol is in the output) and prints one
JSON line. ``--baseline`` also trains the character-level baseline (bench/char_baseline.py) for
the same time and scores it on the whole validation text.

A budget in seconds depends on the machine and on its load; studies/budget/ (a DVC pipeline)
compares settings at a budget of FLOPs instead, with every cell cached.

    python bench/budget.py --seconds 540 --compile [--preset micro] [--n-embd 192] [--optimizer adamw]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pydantic

from char_baseline import train_and_score
from openllm.config import MODEL_PRESETS
from openllm.schedule import Schedule
from openllm.study import Cell, CellTrainer, ScoreConfig, ShapeConfig, StudyConfig, StudyError


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with the budget and the data folder checked."""
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
    return parser, args


def build_trainer(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, CellTrainer]:
    """The model shape (the preset with the command line's overrides) and its cell trainer."""
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in MODEL_PRESETS[args.preset].items()}
    if shape["n_embd"] % shape["n_head"]:
        parser.error(f"model shape: n_embd={shape['n_embd']} must be divisible by n_head={shape['n_head']}")
    try:
        study = StudyConfig(
            model=ShapeConfig(context_length=shape["context_length"], head_dim=shape["n_embd"] // shape["n_head"],
                              mlp_ratio=shape["intermediate_size"] / shape["n_embd"]),
            train={"weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
                   "compile": "true" if args.compile else "false", "decay_fraction": args.decay_fraction},
            min_lr_ratio=args.min_lr_ratio)
        cell = Cell(0, shape["n_layer"], shape["n_embd"], args.optimizer, args.learning_rate, args.schedule,
                    args.batch_size)
        return shape, CellTrainer(study, cell, args.data, steps=10**9)  # the peak until the speed is known
    except (pydantic.ValidationError, StudyError) as error:
        parser.error(str(error))


def train_for(trainer: CellTrainer, seconds: float) -> float:
    """Train until ``seconds`` have passed (compiling included); returns the seconds spent.

    The schedule's length is fitted to the budget from the speed of 30 steps after warmup.
    """
    started, progress, warmup = time.perf_counter(), trainer.state.progress, trainer.cfg.warmup_steps
    trainer.compile()
    while time.perf_counter() - started < seconds:
        if progress.step == warmup + 10:  # speed measured over 30 steps after warmup and compiling
            mark = time.perf_counter()
        if progress.step == warmup + 40:
            per_step = (time.perf_counter() - mark) / 30
            planned = progress.step + int((seconds - (time.perf_counter() - started)) / per_step)
            trainer.schedule = Schedule.from_config(trainer.cfg.model_copy(update={"max_steps": planned}))
        trainer.step()
    return time.perf_counter() - started


def main() -> None:
    parser, args = parse_args()
    shape, trainer = build_trainer(parser, args)
    train_seconds = train_for(trainer, args.seconds)
    progress = trainer.state.progress
    scores = trainer.score(ScoreConfig())
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "shape": shape,
        "parameters": trainer.model.num_parameters(), "steps": progress.step, "tokens": progress.tokens_seen,
        "train_seconds": round(train_seconds, 1),
        "val_bits_per_byte": scores["val_bits_per_byte"], "val_protocol": scores["val_protocol"],
    }
    if args.baseline:
        result["char_baseline"] = train_and_score(args.seconds, args.data.parent / "raw")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
