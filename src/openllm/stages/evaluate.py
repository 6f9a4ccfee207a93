"""Stage ``evaluate``: loss, perplexity, bits per byte and samples of one checkpoint."""

from __future__ import annotations

import sys

from ..config import load_params
from ..evaluate import evaluate_checkpoint, log_to_mlflow
from ..paths import CHECKPOINTS_DIR, METRICS_DIR, TOKENIZED_DIR, evaluation_path, samples_path, step_folder
from . import stage_main


def run(args) -> None:
    params = load_params(args.params)
    metrics_path, samples = evaluation_path(METRICS_DIR, args.step), samples_path(METRICS_DIR, args.step)
    metrics, timings = evaluate_checkpoint(step_folder(CHECKPOINTS_DIR, args.step), TOKENIZED_DIR, params.evaluate,
                                           metrics_path, samples, progress=sys.stderr.isatty())
    log_to_mlflow(params.mlflow.experiment, CHECKPOINTS_DIR, metrics | timings, samples)
    print(f"step-{args.step}: val loss {metrics['val_loss']:.4f}, perplexity {metrics['val_perplexity']:.2f}, "
          f"{metrics['val_bits_per_byte']:.4f} bits/byte -> {metrics_path}, {samples}")


main = stage_main(run, __doc__, step=True)

if __name__ == "__main__":
    sys.exit(main())
