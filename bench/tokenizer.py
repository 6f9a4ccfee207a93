"""Tokenizer speed on the default corpus: SentencePiece training time and encoding MB/s.

Encoding is measured with one process (SentencePiece's own speed) and with the tokenize stage's
worker pool (one process per core), next to the time to read the text (the floor).

    python bench/tokenizer.py --out bench/results/tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from openllm.config import TokenizerConfig
from openllm.data import shakespeare_documents
from openllm.fileio import write_json
from openllm.tokenizer import encode_documents, load_tokenizer, token_dtype, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/tokenizer.json"))
    parser.add_argument("--vocab-size", type=int, default=TokenizerConfig().vocab_size)
    args = parser.parse_args()

    plays, _ = shakespeare_documents()
    documents = [text for _, text in plays]
    megabytes = sum(len(text.encode("utf-8")) for text in documents) / 1e6
    cfg = TokenizerConfig(vocab_size=args.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "tokenizer.model"
        started = time.perf_counter()
        train_tokenizer(documents, cfg, model_path)
        train_seconds = time.perf_counter() - started

        tokenizer = load_tokenizer(model_path)
        started = time.perf_counter()
        tokens = sum(len(ids) for ids in tokenizer.encode(documents))
        one_process = time.perf_counter() - started

        workers = os.cpu_count() or 1
        started = time.perf_counter()
        encode_documents(iter(documents), model_path, Path(tmp) / "tokens.bin", token_dtype(args.vocab_size),
                         cfg.chunk_bytes, workers)
        pool = time.perf_counter() - started
        stored = np.fromfile(Path(tmp) / "tokens.bin", dtype=token_dtype(args.vocab_size))
    result = {
        "corpus_megabytes": megabytes, "documents": len(documents), "vocab_size": args.vocab_size,
        "tokens": tokens, "bytes_per_token": megabytes * 1e6 / tokens,
        "train_seconds": train_seconds,
        "encode_mb_per_second_1_process": megabytes / one_process,
        f"encode_mb_per_second_{workers}_processes": megabytes / pool,
        "workers": workers, "stored_tokens": int(len(stored)),
    }
    write_json(args.out, result, sort_keys=False)  # keep the order the report prints
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
