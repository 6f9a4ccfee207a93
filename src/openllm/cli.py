"""The ``openllm`` command: one subcommand per pipeline stage, plus tools for users.

Stages (``download``, ``tokenize``, ``train``, ``evaluate``, ``export``) read params.yaml,
call library code and write their outputs atomically; dvc.yaml runs them. Errors that come
from the user's input are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from .config import load_params
from .errors import OpenLLMError, TrainingInterrupted

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(func: Callable[[argparse.Namespace], int | None]):
    COMMANDS[func.__name__.removeprefix("cmd_")] = func
    return func


@command
def cmd_download(args: argparse.Namespace) -> None:
    from .config import RAW_DIR
    from .data import download

    params = load_params(args.params)
    manifest = download(params.data, RAW_DIR)
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']} documents, {split['bytes']:,} bytes -> {RAW_DIR / split['file']}")


@command
def cmd_tokenize(args: argparse.Namespace) -> None:
    from .config import RAW_DIR, TOKENIZED_DIR
    from .tokenizer import tokenize

    params = load_params(args.params)
    meta = tokenize(RAW_DIR, TOKENIZED_DIR, params.tokenizer, progress=True)
    for name in ("train", "val"):
        split = meta[name]
        print(
            f"{name}: {split['tokens']:,} tokens from {split['bytes']:,} bytes "
            f"({meta['bytes_per_token'][name]:.2f} bytes/token) -> {TOKENIZED_DIR / split['file']}"
        )


@command
def cmd_train(args: argparse.Namespace) -> None:
    from .config import CHECKPOINTS_DIR, METRICS_DIR, TOKENIZED_DIR
    from .train import train

    params = load_params(args.params)
    summary = train(params, TOKENIZED_DIR, CHECKPOINTS_DIR, METRICS_DIR, progress=True)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained {summary['steps']} steps ({summary['tokens_seen']:,} tokens), val loss "
            f"{summary['val_loss']:.4f}, {summary['tokens_per_second']:,.0f} tokens/s -> {CHECKPOINTS_DIR}"
        )


@command
def cmd_evaluate(args: argparse.Namespace) -> None:
    from .checkpoint import step_folder
    from .config import CHECKPOINTS_DIR, METRICS_DIR, TOKENIZED_DIR
    from .evaluate import evaluate_checkpoint, log_to_mlflow

    params = load_params(args.params)
    metrics_path = METRICS_DIR / "evaluate" / f"step-{args.step}.json"
    samples_path = METRICS_DIR / "samples" / f"step-{args.step}.md"
    metrics = evaluate_checkpoint(step_folder(CHECKPOINTS_DIR, args.step), TOKENIZED_DIR, params.evaluate,
                                  metrics_path, samples_path, progress=True)
    log_to_mlflow(params.mlflow.experiment, metrics, samples_path)
    print(
        f"step-{args.step}: val loss {metrics['val_loss']:.4f}, perplexity {metrics['val_perplexity']:.2f}, "
        f"{metrics['val_bits_per_byte']:.4f} bits/byte -> {metrics_path}, {samples_path}"
    )


@command
def cmd_report(args: argparse.Namespace) -> None:
    from .config import METRICS_DIR
    from .report import build_report, update_readme

    params = load_params(args.params)
    report = build_report(METRICS_DIR, params.train.checkpoint_steps)
    if args.readme:
        update_readme(Path(args.readme), (METRICS_DIR / "results.md").read_text())
    print(f"{len(report['rows'])} checkpoints -> {METRICS_DIR / 'results.md'}, {METRICS_DIR / 'plots'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openllm", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("download", help="stage: gather the corpus into data/raw/")
    sub.add_parser("tokenize", help="stage: train the tokenizer and encode data/raw/")
    sub.add_parser("train", help="stage: train (or resume) and write models/checkpoints/step-N")
    evaluate = sub.add_parser("evaluate", help="stage: loss, perplexity, bits per byte and samples of a checkpoint")
    evaluate.add_argument("--step", type=int, required=True, help="checkpoint step (models/checkpoints/step-N)")
    report = sub.add_parser("report", help="stage: table and plots across the evaluated checkpoints")
    report.add_argument("--readme", help="also write the results table into this README")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except TrainingInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 143
    except OpenLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
