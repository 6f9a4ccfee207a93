"""Plain helpers shared by the test files (import with ``from helpers import ...``)."""

from __future__ import annotations

import copy
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Small documents with the text that tokenizers and JSON writers get wrong: accents, emoji,
# CJK, leading/multiple spaces, tabs and runs of newlines. Name -> exact file content.
TINY_DOCS: dict[str, str] = {
    "a_hello.txt": "Hello, world!\nThis is a tiny corpus for the tests.\n",
    "b_french.txt": "Café au lait, crème brûlée et déjà vu.\n\n  Deux  espaces   ici.\n",
    "c_emoji.txt": "Emoji: 🙂🚀 and more 🎉 in a line.\n\n\nThree newlines above.\n",
    "d_cjk.txt": "東京は日本の首都です。\n漢字とひらがな、カタカナ。\n",
    "e_spaces.txt": "   leading spaces\n\ttabbed\tline\nmultiple    spaces    between   words\n\n",
}


# Params for running the whole pipeline in seconds: a 1-layer model, 20 steps, two checkpoints,
# a corpus of `corpus/*.txt` (write_params deep-merges this onto the repository's params.yaml).
TINY_PIPELINE: dict[str, Any] = {
    "data": {"source": "files", "folder": "corpus", "files": {"glob": "corpus/*.txt"}},
    "tokenizer": {"vocab_size": 400, "workers": 1},
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "intermediate_size": 64, "context_length": 32},
    "train": {"max_steps": 20, "checkpoint_steps": [10, 20], "batch_size": 4, "eval_interval": 10,
              "eval_batches": 2, "compile": "false", "sample_tokens": 4, "warmup_steps": 2,
              "resume_interval": 10, "device": "cpu", "precision": "fp32"},
    "evaluate": {"prompts": ["Ka"], "sampling": {"max_new_tokens": 4}},
    "export": {"quantize": False, "huggingface": False, "register_model": False},
}


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in (nested mappings merged key by key)."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def repo_params() -> dict[str, Any]:
    """The repository's params.yaml, parsed."""
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


def write_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write the repository's params.yaml with ``overrides`` deep-merged onto it.

    ``path`` may be a file or a folder (then ``params.yaml`` inside it). Returns the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    params = deep_merge(repo_params(), overrides or {})
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment with the venv's bin first on PATH (so `python`, `dvc` resolve)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_openllm(*args: str, cwd: str | Path, timeout: float = 120, **extra_env: str):
    """Run ``python -m openllm ARGS`` in ``cwd``; return the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "openllm", *args],
        cwd=cwd, env=subprocess_env(**extra_env), capture_output=True, text=True, timeout=timeout,
    )


def snapshot_tree(folder: str | Path) -> dict[str, tuple[bytes, int]]:
    """Relative path -> (bytes, mtime_ns) of every file below ``folder``."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def corpus_text(seed: int, words: int) -> str:
    """Pseudo-words from syllables: enough distinct pairs for a 512-piece vocabulary."""
    rng = random.Random(seed)
    syllables = "ka lo mi ne ru sa to vi el an or is um be da fi go hu ja ze qu wy xo pé ñu".split()
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(lexicon))
        if len(line) >= rng.randint(6, 14):
            lines.append(" ".join(line).capitalize() + rng.choice([".", ",", "!", ";"]))
            line = []
    return "\n".join(lines) + "\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check: Callable[[], Any], timeout: float, diagnose: Callable[[], str] = str) -> Any:
    """Poll ``check`` every half second until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f} s\n{diagnose()}")


def prefect_server(folder: Path, port: int, **extra: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment settings of a ``prefect server`` on 127.0.0.1:``port``, for it
    and its clients: its home and SQLite database in ``folder``, no UI, no analytics, the
    scheduler every 5 s, plus ``extra``. The API is at ``settings["PREFECT_API_URL"]``."""
    command = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    settings = dict(
        PREFECT_HOME=str(folder / "home"),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
    )
    return command, settings | extra
