"""The ``openllm`` command: the pipeline stages, plus tools for users.

The stage subcommands (``check``, ``download``, ``tokenize``, ``train``, ``evaluate``,
``export``, ``report``) run the modules in :mod:`openllm.stages`, which dvc.yaml runs directly.
Errors that come from the user's input are printed as one line (``error: ...``) with exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Callable

from .config import load_params
from .errors import OpenLLMError, exit_status
from .genai_engine import ENGINES

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}

# name -> (help, takes --step); each runs openllm.stages.<name>.run
STAGES = {
    "check": ("validate the whole params.yaml (make run does this before dvc repro)", False),
    "download": ("stage: gather the corpus into data/raw/", False),
    "tokenize": ("stage: train the tokenizer and encode data/raw/", False),
    "train": ("stage: train (or resume) and write models/checkpoints/step-N", False),
    "evaluate": ("stage: loss, perplexity, bits per byte and samples of a checkpoint", True),
    "export": ("stage: ONNX (+ int8, Hugging Face) folder of a checkpoint, registered", True),
    "report": ("stage: summary metrics, table and plots across the listed checkpoints", False),
}


def command(func: Callable[[argparse.Namespace], int | None]):
    COMMANDS[func.__name__.removeprefix("cmd_")] = func
    return func


def run_stage(args: argparse.Namespace) -> None:
    importlib.import_module(f"openllm.stages.{args.command}").run(args)


@command
def cmd_generate(args: argparse.Namespace) -> None:
    from .runtime import OnnxGenerator

    for text in (args.prompt, *(args.stop or ())):
        try:  # the shell passes bytes: invalid UTF-8 arrives as lone surrogates (surrogateescape)
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise OpenLLMError(f"{text!r} is not valid UTF-8 text (byte {exc.start})") from None
    generator = OnnxGenerator.load(args.model, quantized=args.int8, engine=args.engine)
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
    for name, (help_text, with_step) in STAGES.items():
        stage = sub.add_parser(name, help=help_text)
        if with_step:
            stage.add_argument("--step", type=int, required=True, help="checkpoint step (models/checkpoints/step-N)")
        stage.set_defaults(func=run_stage)
    sub.choices["report"].add_argument("--readme", help="also write the results table into this README")
    generate = sub.add_parser("generate", help="stream a completion from an exported model (onnxruntime)")
    generate.add_argument("--model", required=True, help="models/export/step-N or models:/<name>@<alias>")
    generate.add_argument("--temperature", type=float, help="0 = greedy (default: the export's sampling)")
    generate.add_argument("--top-k", type=int, help="0 = off")
    generate.add_argument("--top-p", type=float, help="1 = off")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--seed", type=int, help="same seed, same text")
    generate.add_argument("--stop", action="append", help="stop before this text (repeatable; $'\\n' for a newline)")
    generate.add_argument("--int8", action="store_true", help="use the int8 model")
    generate.add_argument("--engine", choices=ENGINES, default="onnxruntime",
                          help="onnxruntime (default) or genai: onnxruntime-genai generates (same greedy text; "
                               "sampled text follows its own random generator)")
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
    for name, func in COMMANDS.items():
        sub.choices[name].set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return exit_status(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
