"""Every figure and number of the documentation, computed from the code and the checkpoints.

``make docs`` runs ``python -m openllm.docs_figures`` and then builds the site, so nothing in
the docs is pasted by hand: the pages include the markdown pieces and PNG charts written here
into ``docs/generated/`` (git-ignored). It reads a project after ``make run``:

- ``models/checkpoints/step-N`` -- the tokenizer, the model shapes, the bias probe;
- ``models/export/step-N`` -- next-token distributions, attention maps, the ONNX interface;
- ``metrics/`` -- the evaluation figures, samples and training curves;
- ``params.yaml`` -- the learning-rate schedule, drawn by the training code's own function.

One module per group of chapters: ``training`` (2 to 4), ``evaluation`` (5 and 8), ``inference``
(6, 7 and the app's attention maps, from the last export); ``project`` holds what they share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import OpenLLMError
from .evaluation import bias, budget, evaluation, surprisal
from .inference import attention, export_facts, sampling
from .project import DocsFiguresError, Project
from .training import model_shapes, presets, schedule, tokenization, training_curves

__all__ = ["DocsFiguresError", "FIGURES", "Project", "generate", "main"]

FIGURES = (tokenization, model_shapes, presets, schedule, training_curves, evaluation, surprisal, sampling,
           export_facts, attention, bias, budget)


def generate(root: Path, out: Path) -> list[str]:
    """Write every figure and number of the docs into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    project = Project.open(root)
    out.mkdir(parents=True, exist_ok=True)
    for make in FIGURES:
        make(project, out)
    return sorted(p.name for p in out.iterdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openllm.docs_figures", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project folder (default: here)")
    parser.add_argument("--out", type=Path, default=Path("docs/generated"), help="where to write (default: docs/generated)")
    args = parser.parse_args(argv)
    try:
        written = generate(args.root, args.out)
    except OpenLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(written)} files in {args.out}: {', '.join(written)}")
    return 0
