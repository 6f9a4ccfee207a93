"""The real DVC pipeline (download -> tokenize) in a throwaway git repository."""

from __future__ import annotations

import json
import random
import shutil
import subprocess

import pytest
import yaml

from helpers import snapshot_tree, subprocess_env, write_params

STAGES = ("download", "tokenize")  # dvc.yaml has later stages; only these two are run here


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


@pytest.fixture
def dvc_repo(tmp_path, repo_root):
    """A git + DVC repository with the project's dvc.yaml, params.yaml, src/ and a small corpus."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(repo_root / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(repo_root / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    corpus = repo / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(corpus_text(i, 800), encoding="utf-8")
    env = subprocess_env(
        PYTHONPATH=str(repo / "src"),  # run the copied code (the code the stages depend on)
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"),
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        GIT_CONFIG_NOSYSTEM="1",
    )

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
        if check:
            assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
        return result

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    write_params(repo, {
        "data": {"source": "files", "files": {"glob": "corpus/*.txt"}},
        "tokenizer": {"vocab_size": 512, "workers": 1},
    })
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "pipeline under test")
    return repo, run


def lock_stages(repo) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"]


def test_download_tokenize_pipeline(dvc_repo):
    repo, run = dvc_repo
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))

    # 1. First run: both stages run and write their outputs.
    first = run("dvc", "repro", *STAGES)
    out = first.stdout + first.stderr
    assert "Running stage 'download'" in out and "Running stage 'tokenize'" in out, out
    assert "Running stage 'train'" not in out
    raw, tokenized = repo / "data" / "raw", repo / "data" / "tokenized"
    assert sorted(p.name for p in raw.iterdir()) == ["manifest.json", "train.jsonl", "val.jsonl"]
    assert sorted(p.name for p in tokenized.iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]
    manifest = json.loads((raw / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 12
    meta = json.loads((tokenized / "meta.json").read_text(encoding="utf-8"))
    assert meta["vocab_size"] == 512 and meta["train"]["tokens"] > 10_000 and meta["val"]["tokens"] > 0
    assert sorted(p.name for p in (repo / "data").iterdir() if not p.name.startswith(".gitignore")) == ["raw", "tokenized"]

    # dvc.lock records both stages with the params they read, and nothing downstream.
    stages = lock_stages(repo)
    assert set(stages) == set(STAGES)
    assert stages["download"]["params"]["params.yaml"]["data"] == params["data"]
    assert stages["tokenize"]["params"]["params.yaml"]["tokenizer"] == params["tokenizer"]
    assert "tokenizer" not in stages["download"]["params"]["params.yaml"]
    assert [o["path"] for o in stages["download"]["outs"]] == ["data/raw"]
    assert [o["path"] for o in stages["tokenize"]["outs"]] == ["data/tokenized"]
    assert {d["path"] for d in stages["tokenize"]["deps"]} == {"data/raw", "src/openllm/tokenizer.py"}
    assert {d["path"] for d in stages["download"]["deps"]} == {"src/openllm/data.py"}
    lock_before = (repo / "dvc.lock").read_bytes()
    files_before = snapshot_tree(repo / "data")

    # 2. Nothing changed: nothing runs, no file is rewritten.
    second = run("dvc", "repro", *STAGES)
    out = second.stdout + second.stderr
    assert "Running stage" not in out, out
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change" in out or f"Stage '{stage}' is cached" in out, out
    assert "up to date" in out
    assert snapshot_tree(repo / "data") == files_before
    assert (repo / "dvc.lock").read_bytes() == lock_before

    # 3. A tokenizer parameter changed: only tokenize reruns.
    write_params(repo, {
        "data": params["data"],
        "tokenizer": {**params["tokenizer"], "vocab_size": 400},
    })
    third = run("dvc", "repro", *STAGES)
    out = third.stdout + third.stderr
    assert "Running stage 'tokenize'" in out, out
    assert "Running stage 'download'" not in out and "Stage 'download' didn't change" in out, out
    raw_after = snapshot_tree(raw)
    assert raw_after == {k.removeprefix("raw/"): v for k, v in files_before.items() if k.startswith("raw/")}
    assert json.loads((tokenized / "meta.json").read_text(encoding="utf-8"))["vocab_size"] == 400
    stages = lock_stages(repo)
    assert stages["tokenize"]["params"]["params.yaml"]["tokenizer"]["vocab_size"] == 400
    assert stages["download"] == yaml.safe_load(lock_before)["stages"]["download"]


def test_stage_error_reaches_dvc(dvc_repo):
    repo, run = dvc_repo
    write_params(repo, {"data": {"source": "files", "files": {"glob": "no-such-folder/*.txt"}}})
    result = run("dvc", "repro", "download", check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "error: data.files.glob='no-such-folder/*.txt' matches no files" in out
    assert "Traceback" not in out
    assert not (repo / "data" / "raw").exists()
