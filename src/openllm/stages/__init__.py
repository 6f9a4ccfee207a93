"""The DVC stages, one module each, named after its stage in dvc.yaml.

A stage module is thin: it reads params.yaml (validated), calls library code and prints one line
per output. ``python -m openllm.stages.<name>`` is what dvc.yaml runs, so a stage's import
closure (the files its ``deps`` must list) is that module's, not the whole command line's;
``openllm <name>`` runs the same code.
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable

from ..errors import exit_status


def stage_main(run: Callable[[argparse.Namespace], object], description: str, step: bool = False):
    """A ``main(argv)`` for a stage module: ``--params`` (and ``--step``), errors as one line."""

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(description=description)
        add_arguments(parser, step)
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return exit_status(lambda: run(args))

    return main


def add_arguments(parser: argparse.ArgumentParser, step: bool) -> None:
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: %(default)s)")
    if step:
        parser.add_argument("--step", type=int, required=True, help="checkpoint step (models/checkpoints/step-N)")
