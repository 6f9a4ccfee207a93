"""Stage ``tokenize``: train the SentencePiece tokenizer and encode ``data/raw/`` into ``data/tokenized/``."""

from __future__ import annotations

import sys

from ..config import load_params
from ..paths import RAW_DIR, TOKENIZED_DIR
from ..tokenizer import tokenize
from . import stage_main


def run(args) -> None:
    meta = tokenize(RAW_DIR, TOKENIZED_DIR, load_params(args.params).tokenizer, progress=sys.stderr.isatty())
    for name in ("train", "val"):
        split = meta[name]
        print(f"{name}: {split['tokens']:,} tokens from {split['bytes']:,} bytes "
              f"({meta['bytes_per_token'][name]:.2f} bytes/token) -> {TOKENIZED_DIR / split['file']}")


main = stage_main(run, __doc__)

if __name__ == "__main__":
    sys.exit(main())
