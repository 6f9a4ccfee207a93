"""Session-wide settings and fixtures shared by every test file.

The environment is set at import time, before any test module imports datasets,
huggingface_hub, mlflow or prefect (some of them read it once, on import): no telemetry, no
network for Hugging Face, and caches/homes in a temporary folder removed at the end.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="openllm-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)

os.environ.update(
    DVC_NO_ANALYTICS="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="true",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    HF_HOME=str(_SESSION_DIR / "hf"),
    PREFECT_HOME=str(_SESSION_DIR / "prefect"),
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so that `import helpers` works

from helpers import REPO_ROOT, TINY_DOCS, write_params  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding params.yaml and dvc.yaml)."""
    assert (REPO_ROOT / "params.yaml").is_file(), REPO_ROOT
    return REPO_ROOT


@pytest.fixture(scope="session")
def session_dir() -> Path:
    """A temporary folder for the whole session (HF_HOME and PREFECT_HOME live below it)."""
    return _SESSION_DIR


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A folder ``corpus/`` of small .txt documents (see helpers.TINY_DOCS for the texts)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in TINY_DOCS.items():
        (folder / name).write_text(text, encoding="utf-8", newline="")
    return folder


@pytest.fixture
def params_file(tmp_path: Path):
    """``params_file(overrides)``: write params.yaml (the repo's, with overrides) in tmp_path."""

    def make(overrides: dict | None = None, name: str = "params.yaml") -> Path:
        return write_params(tmp_path / name, overrides or {})

    return make
