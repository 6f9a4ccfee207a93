"""The ``tokenize`` stage: train a SentencePiece BPE tokenizer and encode the corpus.

Output in ``data/tokenized/``: ``tokenizer.model``, ``train.bin`` / ``val.bin`` (flat token
ids, uint16 when the vocabulary fits, else uint32; documents separated by the end-of-text
id) and ``meta.json`` (dtype, token and byte counts, tokenizer sha256).

SentencePiece's defaults are lossy (they normalise text, drop newlines, collapse spaces and
add a dummy prefix); the options below make ``decode(encode(text)) == text`` for any UTF-8.
"""

from __future__ import annotations

from .errors import OpenLLMError

import io
import multiprocessing as mp
import os
import re
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm

from .config import TokenizerConfig
from .fileio import atomic_dir, iter_documents, read_json, sha256_file, write_json

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2  # the Llama convention; EOS also separates documents

LOSSLESS_OPTIONS = dict(
    normalization_rule_name="identity",  # no NFKC: keep every character as written
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,  # unseen characters become <0xNN> byte pieces, never <unk>
    character_coverage=1.0,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    user_defined_symbols=["\n"],  # newline is a symbol of its own
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=-1,
)


class TokenizerError(OpenLLMError, ValueError):
    """The tokenizer cannot be trained or loaded."""


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file, with a clear error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except Exception as exc:
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({exc})") from None
    return processor


def _training_lines(documents: Iterable[str], limit: int) -> Iterator[str]:
    """Lines of the training text (SentencePiece trains on lines; newline is its own symbol)."""
    count = 0
    for text in documents:
        for line in text.split("\n"):
            if line:
                yield line
                count += 1
                if count >= limit:
                    return


def train_tokenizer(documents: Iterable[str], cfg: TokenizerConfig, model_path: Path) -> None:
    """Train SentencePiece on ``documents`` and write the model file to ``model_path``."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents, cfg.training_sentences),
            model_writer=model,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            input_sentence_size=cfg.training_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
            **LOSSLESS_OPTIONS,
        )
    except RuntimeError as exc:
        message = str(exc)
        if match := re.search(r"Please set it to a value <= (\d+)", message):
            raise TokenizerError(
                f"tokenizer.vocab_size={cfg.vocab_size} is larger than this corpus supports "
                f"(at most {match.group(1)})"
            ) from None
        if match := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
            raise TokenizerError(
                f"tokenizer.vocab_size={cfg.vocab_size} is too small for this corpus: its distinct "
                f"characters and special pieces need at least {match.group(1)}"
            ) from None
        raise TokenizerError(f"SentencePiece training failed: {message}") from None
    model_path.write_bytes(model.getvalue())


# --- encoding in parallel, in bounded memory ------------------------------------------------

_worker_processor: spm.SentencePieceProcessor | None = None


def _init_worker(model_path: str) -> None:
    global _worker_processor
    _worker_processor = load_tokenizer(model_path)


def _encode_chunk(documents: list[str]) -> np.ndarray:
    """Encode a list of documents, each followed by the end-of-text id."""
    ids: list[int] = []
    for pieces in _worker_processor.encode(documents):
        ids.extend(pieces)
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.uint32)


def _chunks(documents: Iterable[str], chunk_bytes: int) -> Iterator[tuple[list[str], int]]:
    """Group documents into lists of about ``chunk_bytes`` of UTF-8 text."""
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text.encode("utf-8"))
        if size >= chunk_bytes:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_documents(
    documents: Iterable[str],
    model_path: Path,
    out_path: Path,
    dtype: np.dtype,
    chunk_bytes: int,
    workers: int,
    on_progress: Callable[[int], None] = lambda n: None,
) -> dict:
    """Encode documents into a flat token file, using ``workers`` processes.

    At most ``2 * workers`` chunks are in flight, so memory stays bounded by the chunk size
    however large the corpus is. Chunks are written in order, so the output is deterministic.
    """
    workers = workers or os.cpu_count() or 1
    tokens = documents_count = text_bytes = 0
    context = mp.get_context("spawn" if os.name != "posix" else "fork")
    with open(out_path, "wb") as out, context.Pool(workers, _init_worker, (str(model_path),)) as pool:
        pending: deque = deque()

        def drain_one() -> None:
            nonlocal tokens
            ids = pending.popleft().get()
            out.write(ids.astype(dtype).tobytes())
            tokens += len(ids)

        for batch, size in _chunks(documents, chunk_bytes):
            pending.append(pool.apply_async(_encode_chunk, (batch,)))
            documents_count += len(batch)
            text_bytes += size
            on_progress(size)
            while len(pending) >= 2 * workers:
                drain_one()
        while pending:
            drain_one()
    return {"tokens": tokens, "documents": documents_count, "bytes": text_bytes}


def tokenize(raw_dir: Path, out_dir: Path, cfg: TokenizerConfig, progress: bool = False) -> dict:
    """Run the tokenize stage: train on ``raw_dir/train.jsonl``, encode both splits."""
    from tqdm import tqdm

    splits = {name: raw_dir / f"{name}.jsonl" for name in ("train", "val")}
    for path in splits.values():
        if not path.is_file():
            raise TokenizerError(f"{path}: not found (run the download stage first)")
    manifest = read_json(raw_dir / "manifest.json")
    total = sum(manifest["splits"][name]["bytes"] for name in splits)
    dtype = token_dtype(cfg.vocab_size)
    with atomic_dir(out_dir) as tmp:
        model_path = tmp / "tokenizer.model"
        train_tokenizer(iter_documents(splits["train"]), cfg, model_path)
        processor = load_tokenizer(model_path)
        meta = {
            "tokenizer": "tokenizer.model",
            "tokenizer_sha256": sha256_file(model_path),
            "vocab_size": processor.vocab_size(),
            "model_type": cfg.model_type,
            "dtype": dtype.name,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "unk_id": UNK_ID,
            "source_manifest_sha256": sha256_file(raw_dir / "manifest.json"),
        }
        with tqdm(total=total, unit="B", unit_scale=True, desc="encode", disable=not progress) as bar:
            for name, path in splits.items():
                stats = encode_documents(
                    iter_documents(path), model_path, tmp / f"{name}.bin", dtype,
                    cfg.chunk_bytes, cfg.workers, bar.update,
                )
                meta[name] = {"file": f"{name}.bin", **stats, "sha256": sha256_file(tmp / f"{name}.bin")}
        meta["bytes_per_token"] = {
            name: meta[name]["bytes"] / max(1, meta[name]["tokens"]) for name in splits
        }
        write_json(tmp / "meta.json", meta)
    return meta


def load_tokens(tokenized_dir: Path, split: str) -> np.memmap:
    """Memory-map one split's token file with the dtype recorded in ``meta.json``."""
    meta = read_json(tokenized_dir / "meta.json")
    return np.memmap(tokenized_dir / meta[split]["file"], dtype=np.dtype(meta["dtype"]), mode="r")
