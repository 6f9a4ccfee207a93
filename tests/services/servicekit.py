"""Helpers for the tests against real services: processes in their own session, polling,
a throwaway copy of the project as a git + DVC repository (fixtures: conftest.py)."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from helpers import REPO_ROOT, TINY_PIPELINE, deep_merge, subprocess_env, wait_until, write_params  # noqa: F401

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # ops/ and pipelines/ are packages at the repository root

from ops.postgres import free_port  # noqa: E402,F401  (re-exported for the tests)
from ops.processes import group_alive, stop_group  # noqa: E402


@dataclass
class Service:
    """A process started in its own session, its output in a log file."""

    name: str
    log: Path
    process: subprocess.Popen | None = None
    extra_logs: list[Path] = field(default_factory=list)

    def start(self, command: list[str], env: dict[str, str], cwd: Path = REPO_ROOT) -> "Service":
        with open(self.log, "a") as out:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def tail(self, chars: int = 4000) -> str:
        parts = [f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}"
                 for path in [self.log, *self.extra_logs] if path.exists()]
        return "\n".join(parts)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, grace=20)
            assert not group_alive(self.process), f"{self.name} left processes behind"


def reachable_temp_dir(prefix: str) -> Path:
    """A temporary folder the ``postgres`` user can enter (mkdtemp makes 0700 folders)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


# --- MLflow on PostgreSQL --------------------------------------------------------------------


@dataclass
class TrackingServer:
    url: str
    state_dir: Path
    service: Service

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir / "artifacts"

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)


# --- Prefect ---------------------------------------------------------------------------------


@dataclass
class PrefectApi:
    url: str
    settings: dict[str, str]  # environment variables of the server and its clients
    home: Path
    service: Service


# --- a throwaway copy of the project -------------------------------------------------------------


def corpus_text(seed: int, lines: int) -> str:
    """Lines of pseudo-words built from syllables (enough variety for a 400-piece vocabulary)."""
    rng = random.Random(seed)
    syllables = "ka lo mi ne ru sa to vi el an or is um be da fi go hu".split()
    lexicon = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
    return "".join(" ".join(rng.choices(lexicon, k=10)).capitalize() + ".\n" for _ in range(lines))


def make_dvc_repo(repo: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A git + DVC repository: the project's dvc.yaml and src/, tiny params, a small corpus."""
    shutil.copytree(REPO_ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo / "params.yaml", deep_merge(TINY_PIPELINE, overrides or {}))
    corpus = repo / Path(TINY_PIPELINE["data"]["files"]["glob"]).parent
    corpus.mkdir(parents=True)
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(corpus_text(i, 50), encoding="utf-8")
    env = repo_env(repo)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    for name in ("config", "offline_plots.html"):
        shutil.copy2(REPO_ROOT / ".dvc" / name, repo / ".dvc" / name)
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "pipeline under test"], cwd=repo, env=env, check=True)
    return repo


def repo_env(repo: Path, **extra: str) -> dict[str, str]:
    """The environment for DVC in ``repo``: its own src/ importable, a test git identity."""
    identity = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "test"), ("EMAIL", "test@example.com"))}
    return subprocess_env(PYTHONPATH=str(repo / "src"), GIT_CONFIG_NOSYSTEM="1",
                          DVC_SITE_CACHE_DIR=str(repo.parent / "dvc-site-cache"),
                          OMP_NUM_THREADS="1", **identity, **extra)
