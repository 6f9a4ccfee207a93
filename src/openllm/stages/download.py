"""Stage ``download``: gather the configured corpus into ``data/raw/`` (train and val JSONL)."""

from __future__ import annotations

import sys

from ..config import load_params
from ..data import download
from ..paths import RAW_DIR
from . import stage_main


def run(args) -> None:
    manifest = download(load_params(args.params).data, RAW_DIR)
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']} documents, {split['bytes']:,} bytes -> {RAW_DIR / split['file']}")


main = stage_main(run, __doc__)

if __name__ == "__main__":
    sys.exit(main())
