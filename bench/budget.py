"""Quality for a fixed wall-clock budget: the experiments behind README "Choosing the defaults".

Trains one model shape (a preset plus overrides) on the tokenized default data for a fixed
number of seconds with the budget study's cell trainer (openllm.study.CellTrainer: the train
stage's optimizers, precision, torch.compile, window sampler and schedule), the schedule's
length fitted to the budget from the speed of the first steps (compilation time counts against
the budget). Then scores it as the study and the evaluate stage do (consecutive windows of the
context length over the whole validation split; the protocol is in the output) and prints one
JSON line. ``--baseline`` also trains the character-level baseline (bench/char_baseline.py) for
the same time and scores it on the whole validation text. The research levers params.yaml turns on
(QK-norm and the weight average by default) are on unless ``--levers`` names others ('' for none).

A budget in seconds depends on the machine and on its load; studies/budget/ (a DVC pipeline)
compares settings at a budget of FLOPs instead, with every cell cached.

    python bench/budget.py --seconds 540 --compile [--preset micro] [--n-embd 192] [--optimizer adamw] [--levers '']
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pydantic

from char_baseline import train_and_score
from openllm.config import MODEL_PRESETS, Params, load_params
from openllm.levers import LEVER_SECTIONS
from openllm.model import LEVER_DEFAULTS
from openllm.schedule import Schedule
from openllm.study import Cell, CellTrainer, ScoreConfig, ShapeConfig, StudyConfig, StudyError

ROOT = Path(__file__).resolve().parents[1]


def params_levers(params: Params) -> str:
    """The research levers params.yaml turns on, as a study entry ("qk_norm+ema_decay=0.999"; "" for none)."""
    # every lever off: the model and training before the levers existed
    off = LEVER_DEFAULTS | {"ema_decay": None, "window_start": "random"}
    parts = []
    for name, section in LEVER_SECTIONS.items():
        if name in off and (value := getattr(getattr(params, section), name)) != off[name]:
            parts.append(name if value is True else f"{name}={value}")
    return "+".join(parts)


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
    parser.add_argument("--levers", default=None,
                        help="research levers as a study entry, e.g. 'qk_norm+ema_decay=0.999'; '' = none "
                             "(default: those params.yaml turns on)")
    parser.add_argument("--baseline", action="store_true", help="also train the character-level baseline")
    args = parser.parse_args()
    if args.levers is None:
        args.levers = params_levers(load_params(ROOT / "params.yaml"))
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    if not (args.data / "meta.json").is_file():
        parser.error(f"{args.data / 'meta.json'} not found: run `dvc repro tokenize` first (or pass --data)")
    return parser, args


def make_trainer(shape: dict, data: Path, *, optimizer: str, learning_rate: float, min_lr_ratio: float,
                 batch_size: int, weight_decay: float, warmup_steps: int, compile: str, schedule: str,
                 decay_fraction: float, levers: str) -> CellTrainer:
    """A cell trainer for one model shape and training setup (raises StudyError or ValueError).

    ``compile`` is train.compile's value: "true", "false" or "auto"."""
    if shape["n_embd"] % shape["n_head"]:
        raise StudyError(f"model shape: n_embd={shape['n_embd']} must be divisible by n_head={shape['n_head']}")
    study = StudyConfig(
        model=ShapeConfig(context_length=shape["context_length"], head_dim=shape["n_embd"] // shape["n_head"],
                          mlp_ratio=shape["intermediate_size"] / shape["n_embd"]),
        train={"weight_decay": weight_decay, "warmup_steps": warmup_steps,
               "compile": compile, "decay_fraction": decay_fraction},
        min_lr_ratio=min_lr_ratio)
    cell = Cell(0, shape["n_layer"], shape["n_embd"], optimizer, learning_rate, schedule, batch_size, levers)
    return CellTrainer(study, cell, data, steps=10**9)  # the peak until the speed is known


def params_trainer(params: Params, data: Path) -> CellTrainer:
    """A cell trainer with the main pipeline's model and training settings (params.yaml)."""
    t = params.train
    return make_trainer(params.model.resolved(), data, optimizer=t.optimizer, learning_rate=t.learning_rate,
                        min_lr_ratio=t.min_learning_rate / t.learning_rate, batch_size=t.batch_size,
                        weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, compile=t.compile,
                        schedule=t.schedule, decay_fraction=t.decay_fraction, levers=params_levers(params))


def build_trainer(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, CellTrainer]:
    """The model shape (the preset with the command line's overrides) and its cell trainer."""
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in MODEL_PRESETS[args.preset].items()}
    try:
        return shape, make_trainer(
            shape, args.data, optimizer=args.optimizer, learning_rate=args.learning_rate,
            min_lr_ratio=args.min_lr_ratio, batch_size=args.batch_size, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps, compile="true" if args.compile else "false", schedule=args.schedule,
            decay_fraction=args.decay_fraction, levers=args.levers)
    except (pydantic.ValidationError, StudyError, ValueError) as error:
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
