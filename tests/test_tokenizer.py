"""The tokenize stage: a lossless SentencePiece model, token files, and bounded-memory encoding."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_DOCS, snapshot_tree
from openllm.config import TokenizerConfig
from openllm.data import write_corpus
from openllm.fileio import iter_documents
from openllm.fileio import sha256_file
from openllm.tokenizer import (
    BOS_ID,
    EOS_ID,
    UNK_ID,
    TokenizerError,
    encode_documents,
    load_tokenizer,
    load_tokens,
    token_dtype,
    tokenize,
    train_tokenizer,
)

VOCAB = 360
WORDS = (
    "the and to of a in that is was he for it with as his on be at by I you thou thy thee "
    "king queen lord lady love death night day heaven earth sweet fair noble good "
    "café crème déjà naïve über Straße 東京 日本 春 🙂 ☀ — “quoted” 'single' 1599 42"
).split()


def generated_documents(count: int, seed: int = 0) -> list[str]:
    """Deterministic English-like documents with punctuation, numbers, runs of whitespace."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        lines = []
        for _ in range(rng.randint(3, 12)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 14))]
            sep = rng.choice([" ", " ", " ", "  ", "\t"])
            lines.append(rng.choice(["", "", "  ", "\t"]) + sep.join(words) + rng.choice(["", ".", ",", "!", "  "]))
        docs.append("\n".join(lines) + rng.choice(["\n", "\n\n", ""]))
    return docs


CORPUS = list(TINY_DOCS.values()) + generated_documents(150)


def tokenizer_config(**overrides) -> TokenizerConfig:
    return TokenizerConfig(**{"vocab_size": VOCAB, "workers": 2, "chunk_bytes": 2048, **overrides})


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """data/raw written from CORPUS, then the tokenize stage run once over it."""
    root = tmp_path_factory.mktemp("tokenize")
    raw, out = root / "data" / "raw", root / "data" / "tokenized"
    write_corpus(raw, ((str(i), t) for i, t in enumerate(CORPUS)), None, 0.1, {"name": "test"})
    meta = tokenize(raw, out, tokenizer_config())
    return raw, out, meta


@pytest.fixture(scope="module")
def processor(stage):
    return load_tokenizer(stage[1] / "tokenizer.model")


TRICKY = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "multiple    spaces   between",
    "\ttab\tseparated\t",
    "\n",
    "\n\nparagraph\n\n\nbreaks\n\n",
    "\r\nwindows line end\r\n",
    "café crème — déjà vu",
    "emoji 🙂 in training, 🦀🧬 not in training",
    "東京 and 日本 seen, 龍 not seen",
    "Ωμέγα Ελληνικά, кириллица, עברית, العربية",
    "zero\u200bwidth and combining e\u0301",
    "ﬁ ligature and full-width ＡＢＣ (NFKC would change these)",
    "digits 1234567890 and 3.14159",
]


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_decode_encode_is_identity(processor, text):
    ids = processor.encode(text)
    assert processor.decode(ids) == text
    assert UNK_ID not in ids


def test_unseen_characters_become_bytes(processor):
    for char in ("🦀", "龍", "Ω"):
        assert char not in "".join(CORPUS)
        pieces = [processor.id_to_piece(i) for i in processor.encode(char)]
        assert pieces and all(p.startswith("<0x") for p in pieces), pieces
        assert len(pieces) == len(char.encode("utf-8"))


def test_newline_is_its_own_piece(processor):
    pieces = [processor.id_to_piece(i) for i in processor.encode("a\n\nb")]
    assert pieces.count("\n") == 2


def test_special_ids(processor):
    assert processor.vocab_size() == VOCAB
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id()) == (UNK_ID, BOS_ID, EOS_ID)
    assert processor.pad_id() == -1


def test_tokenize_outputs(stage, processor):
    raw, out, meta = stage
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    manifest = json.loads((raw / "manifest.json").read_text(encoding="utf-8"))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB
    assert (meta["eos_id"], meta["bos_id"], meta["unk_id"]) == (EOS_ID, BOS_ID, UNK_ID)
    assert meta["tokenizer_sha256"] == sha256_file(out / "tokenizer.model")
    assert meta["source_manifest_sha256"] == sha256_file(raw / "manifest.json")
    for split in ("train", "val"):
        documents = list(iter_documents(raw / f"{split}.jsonl"))
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        expected = [i for doc in documents for i in [*processor.encode(doc), EOS_ID]]
        assert tokens.tolist() == expected  # each document, then EOS
        assert meta[split]["tokens"] == len(expected) == (out / f"{split}.bin").stat().st_size // 2
        assert meta[split]["documents"] == len(documents) == manifest["splits"][split]["documents"]
        assert meta[split]["bytes"] == manifest["splits"][split]["bytes"]
        assert meta[split]["sha256"] == sha256_file(out / f"{split}.bin")
        assert meta["bytes_per_token"][split] == pytest.approx(meta[split]["bytes"] / meta[split]["tokens"])
        # Splitting at EOS gives back the documents, exactly.
        ends = np.flatnonzero(tokens == EOS_ID)
        assert len(ends) == len(documents) and ends[-1] == len(tokens) - 1
        pieces = np.split(tokens, ends + 1)[:-1]
        assert [processor.decode(p[:-1].tolist()) for p in pieces] == documents
        memmap = load_tokens(out, split)
        assert memmap.dtype == np.uint16 and np.array_equal(memmap, tokens)


def test_tokenize_is_deterministic(stage, tmp_path):
    raw, out, meta = stage
    again = tokenize(raw, tmp_path / "tokenized", tokenizer_config(workers=1, chunk_bytes=1 << 20))
    for name in ("train.bin", "val.bin", "tokenizer.model"):
        assert (tmp_path / "tokenized" / name).read_bytes() == (out / name).read_bytes(), name
    assert again == meta


def test_unigram_is_lossless_too(tmp_path):
    path = tmp_path / "unigram.model"
    train_tokenizer(CORPUS, tokenizer_config(model_type="unigram"), path)
    sp = load_tokenizer(path)
    for text in TRICKY + CORPUS[:10]:
        assert sp.decode(sp.encode(text)) == text


def test_token_dtype():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(262_144) == np.uint32


def test_vocab_too_large_names_the_field(stage, tmp_path):
    raw, out, _ = stage
    target = tmp_path / "tokenized"
    tokenize(raw, target, tokenizer_config())
    before = snapshot_tree(target)
    with pytest.raises(TokenizerError) as info:
        tokenize(raw, target, tokenizer_config(vocab_size=20_000))
    message = str(info.value)
    assert "tokenizer.vocab_size=20000" in message and "at most" in message
    assert snapshot_tree(target) == before  # the previous output is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenized"]  # no temporary folder


def test_missing_raw_data(tmp_path):
    with pytest.raises(TokenizerError, match="run the download stage first"):
        tokenize(tmp_path / "raw", tmp_path / "tokenized", tokenizer_config())
    assert not (tmp_path / "tokenized").exists()


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model" * 10, "truncated"], ids=["empty", "garbage", "truncated"])
def test_corrupt_tokenizer_model(stage, tmp_path, content):
    path = tmp_path / "tokenizer.model"
    if content == "truncated":
        content = (stage[1] / "tokenizer.model").read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_missing_tokenizer_model(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.model")


# --- bounded memory ---------------------------------------------------------------------------

STREAM_BYTES = 16 << 20


def synthetic_stream(total_bytes: int):
    """About ``total_bytes`` of UTF-8 text, produced one document at a time (never held)."""
    pool = generated_documents(64, seed=7)
    produced = index = 0
    while produced < total_bytes:
        text = f"{index}: {pool[index % len(pool)]}"
        produced += len(text.encode("utf-8"))
        index += 1
        yield text


def test_encoding_streams_in_bounded_memory(stage, tmp_path):
    model_path = stage[1] / "tokenizer.model"
    out_path = tmp_path / "stream.bin"
    # Trace the parent only: forked workers inherit tracing, which would just slow them down.
    os.register_at_fork(after_in_child=tracemalloc.stop)
    tracemalloc.start()
    try:
        started = time.monotonic()
        stats = encode_documents(
            synthetic_stream(STREAM_BYTES), model_path, out_path, np.dtype(np.uint16),
            chunk_bytes=64 << 10, workers=2,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    assert stats["bytes"] >= STREAM_BYTES
    assert peak < STREAM_BYTES / 4, f"peak {peak:,} bytes of Python memory for {STREAM_BYTES:,} bytes of text"

    # The same tokens as encoding everything in this one process, in order.
    sp = load_tokenizer(model_path)
    digest, tokens, documents, batch = hashlib.sha256(), 0, 0, []

    def flush():
        nonlocal tokens
        for ids in sp.encode(batch):
            array = np.asarray([*ids, EOS_ID], dtype=np.uint16)
            digest.update(array.tobytes())
            tokens += len(array)
        batch.clear()

    for text in synthetic_stream(STREAM_BYTES):
        batch.append(text)
        documents += 1
        if len(batch) == 256:
            flush()
    flush()
    assert (stats["tokens"], stats["documents"]) == (tokens, documents)
    assert out_path.stat().st_size == 2 * tokens
    assert sha256_file(out_path) == digest.hexdigest()
    assert elapsed < 60
