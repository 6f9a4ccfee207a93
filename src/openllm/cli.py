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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openllm", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("download", help="stage: gather the corpus into data/raw/")
    sub.add_parser("tokenize", help="stage: train the tokenizer and encode data/raw/")
    sub.add_parser("train", help="stage: train (or resume) and write models/checkpoints/step-N")
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
