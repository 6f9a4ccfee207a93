"""Stage ``train``: train (or resume) and write ``models/checkpoints/step-N`` for each listed step.

Under torchrun every process runs this module; rank 0 writes and prints.
"""

from __future__ import annotations

import os
import sys

from ..config import load_params
from ..paths import CHECKPOINTS_DIR, METRICS_DIR, TOKENIZED_DIR
from ..train import train
from . import stage_main


def run(args) -> None:
    summary = train(load_params(args.params), TOKENIZED_DIR, CHECKPOINTS_DIR, METRICS_DIR, progress=sys.stderr.isatty())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary['steps']} steps ({summary['tokens_seen']:,} tokens), val loss "
              f"{summary['val_loss']:.4f}, {summary['train_tokens_per_second']:,.0f} tokens/s -> {CHECKPOINTS_DIR}")


main = stage_main(run, __doc__)

if __name__ == "__main__":
    sys.exit(main())
