"""``openllm check``: validate the whole params.yaml before DVC runs anything.

DVC reruns only the stages whose tracked params changed, and removes a stage's outputs before
running it; a typo in a section no changed stage reads would otherwise pass unnoticed, and a
bad value would cost outputs before the stage itself refuses it. ``make run`` and the Prefect
flows run this first.
"""

from __future__ import annotations

import sys

from ..config import load_params
from . import stage_main


def run(args) -> None:
    params = load_params(args.params)
    steps = params.train.checkpoint_steps
    print(f"{args.params}: valid ({params.model.preset} model, {params.train.max_steps} steps, "
          f"checkpoints at {', '.join(map(str, steps))})")


main = stage_main(run, __doc__)

if __name__ == "__main__":
    sys.exit(main())
