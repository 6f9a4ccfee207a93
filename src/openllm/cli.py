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
def cmd_export(args: argparse.Namespace) -> None:
    from .checkpoint import step_folder
    from .config import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_DIR, TOKENIZED_DIR
    from .export import export_checkpoint, validation_tokens

    params = load_params(args.params)
    checkpoint = step_folder(CHECKPOINTS_DIR, args.step)
    out = EXPORT_DIR / f"step-{args.step}"
    report = export_checkpoint(
        checkpoint, out, params.export, params.evaluate.sampling, params.mlflow,
        eval_tokens=validation_tokens(TOKENIZED_DIR, checkpoint),
        metrics_path=METRICS_DIR / "evaluate" / f"step-{args.step}.json",
    )
    extras = [f"max |logit diff| {report['verification']['max_abs_diff_logits']:.1e}"]
    if "int8" in report:
        extras.append(f"int8 {report['int8']['decode_speedup']:.2f}x faster, "
                      f"{report['int8']['bits_per_byte_change']:+.4f} bits/byte")
    if "mlflow" in report:
        extras.append(f"registered {report['mlflow']['registered_model']} v{report['mlflow']['version']}")
    print(f"step-{args.step}: " + ", ".join(extras) + f" -> {out}")


@command
def cmd_generate(args: argparse.Namespace) -> None:
    from .runtime import OnnxGenerator

    for text in (args.prompt, *(args.stop or ())):
        try:  # the shell passes bytes: invalid UTF-8 arrives as lone surrogates (surrogateescape)
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise OpenLLMError(f"{text!r} is not valid UTF-8 text (byte {exc.start})") from None
    generator = OnnxGenerator.load(args.model, quantized=args.int8)
    sampling = generator.sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed)
    results: list = []
    pieces = generator.stream(args.prompt, sampling, stop=args.stop or (), results=results)
    first = next(pieces, "")  # validation errors surface here, before anything is printed
    print(args.prompt + first, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    r = results[0]
    print(f"[{r.completion_tokens} tokens, {r.tokens_per_second:.1f} tokens/s, first token after "
          f"{1000 * r.time_to_first_token:.0f} ms, finish: {r.finish_reason}]", file=sys.stderr)


@command
def cmd_score(args: argparse.Namespace) -> None:
    import json

    path = Path(args.file)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise OpenLLMError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise OpenLLMError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    model = Path(args.model)
    if (model / "COMPLETE").is_file() or (model / "model.safetensors").is_file():  # a checkpoint: PyTorch
        from .evaluate import score_text

        backend, figures = "pytorch", score_text(model, text)
    elif args.model.startswith("models:/") or (model / "config.json").is_file() or (model / "model.onnx").is_file():
        from .runtime import OnnxGenerator

        backend = "onnxruntime-int8" if args.int8 else "onnxruntime"
        figures = OnnxGenerator.load(args.model, quantized=args.int8).score(text)
    else:
        raise OpenLLMError(f"{args.model}: neither a checkpoint (models/checkpoints/step-N with COMPLETE) "
                           "nor an export (models/export/step-N) nor a models:/ URI")
    print(json.dumps({"model": args.model, "backend": backend, "file": str(path), **figures}, indent=2))


@command
def cmd_report(args: argparse.Namespace) -> None:
    from .config import CHECKPOINTS_DIR, METRICS_DIR
    from .report import build_report, log_to_mlflow, update_readme
    from .tracking import read_run_id

    params = load_params(args.params)
    report = build_report(METRICS_DIR, params.train.checkpoint_steps)
    log_to_mlflow(params.mlflow.experiment, read_run_id(CHECKPOINTS_DIR), METRICS_DIR, report["plots"])
    if args.readme:
        update_readme(Path(args.readme), (METRICS_DIR / "results.md").read_text())
    print(f"{len(report['rows'])} checkpoints -> {METRICS_DIR / 'results.md'}, {METRICS_DIR / 'plots'}")


@command
def cmd_serve(args: argparse.Namespace) -> None:
    from .config import parse_params
    from .server import serve

    raw = load_params(args.params).model_dump()
    raw["serve"].update({key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None})
    limits = parse_params(raw, source="openllm serve").serve  # the flags are checked like params.yaml
    serve(args.model or (), limits, quantized=args.int8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openllm", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("download", help="stage: gather the corpus into data/raw/")
    sub.add_parser("tokenize", help="stage: train the tokenizer and encode data/raw/")
    sub.add_parser("train", help="stage: train (or resume) and write models/checkpoints/step-N")
    evaluate = sub.add_parser("evaluate", help="stage: loss, perplexity, bits per byte and samples of a checkpoint")
    evaluate.add_argument("--step", type=int, required=True, help="checkpoint step (models/checkpoints/step-N)")
    export = sub.add_parser("export", help="stage: ONNX (+ int8, Hugging Face) folder of a checkpoint, registered")
    export.add_argument("--step", type=int, required=True, help="checkpoint step (models/checkpoints/step-N)")
    generate = sub.add_parser("generate", help="stream a completion from an exported model (onnxruntime)")
    generate.add_argument("--model", required=True, help="models/export/step-N or models:/<name>@<alias>")
    generate.add_argument("--temperature", type=float, help="0 = greedy (default: the export's sampling)")
    generate.add_argument("--top-k", type=int, help="0 = off")
    generate.add_argument("--top-p", type=float, help="1 = off")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--seed", type=int, help="same seed, same text")
    generate.add_argument("--stop", action="append", help="stop before this text (repeatable; $'\\n' for a newline)")
    generate.add_argument("--int8", action="store_true", help="use the int8 model")
    generate.add_argument("prompt")
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server for the exported models (params.yaml serve)")
    serve.add_argument("--model", action="append",
                       help="export folder or models:/<name>@<alias> (repeatable; default: all of models/export)")
    serve.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1 = this machine only)")
    serve.add_argument("--port", type=int, help="default: serve.port")
    serve.add_argument("--int8", action="store_true", help="serve the int8 models")
    score = sub.add_parser("score", help="loss, perplexity and bits per byte of a UTF-8 text file, as JSON")
    score.add_argument("--model", required=True,
                       help="models/checkpoints/step-N (PyTorch), models/export/step-N or models:/<name>@<alias> (ONNX)")
    score.add_argument("--int8", action="store_true", help="score with the int8 ONNX model")
    score.add_argument("file", help="UTF-8 text file")
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
