"""The real DVC pipeline (download -> tokenize) in a throwaway git repository."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import TINY_PIPELINE, corpus_text, deep_merge, snapshot_tree, subprocess_env, write_params

STAGES = ("download", "tokenize")  # dvc.yaml has later stages; only these two are run here


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
        result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
        if check:
            assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
        return result

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    write_params(repo, {
        "data": {"source": "files", "folder": "corpus", "files": {"glob": "corpus/*.txt"}},
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
    tokenize_deps = {d["path"] for d in stages["tokenize"]["deps"]}
    assert {"data/raw", "src/openllm/tokenizer.py", "src/openllm/stages/tokenize.py"} <= tokenize_deps
    assert "src/openllm/data.py" not in tokenize_deps  # the tokenizer does not run the download code
    download_deps = {d["path"] for d in stages["download"]["deps"]}
    assert {"corpus", "src/openllm/data.py", "src/openllm/stages/download.py"} <= download_deps
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

    # 4. The corpus files are dependencies: an edit and a new file both show, and rerun download.
    assert "up to date" in run("dvc", "status", *STAGES).stdout
    (repo / "corpus" / "doc00.txt").write_text(corpus_text(100, 800), encoding="utf-8")
    assert "changed deps" in run("dvc", "status", "download").stdout
    (repo / "corpus" / "doc99.txt").write_text(corpus_text(99, 300), encoding="utf-8")
    fourth = run("dvc", "repro", *STAGES)
    assert {"download", "tokenize"} <= ran_stages(fourth)
    manifest = json.loads((raw / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 13


def test_stage_error_reaches_dvc(dvc_repo):
    repo, run = dvc_repo
    write_params(repo, {"data": {"source": "files", "folder": "corpus", "files": {"glob": "corpus/none-*.txt"}}})
    result = run("dvc", "repro", "download", check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "error: data.files.glob='corpus/none-*.txt' matches no files" in out
    assert "Traceback" not in out
    assert not (repo / "data" / "raw").exists()


# --- the whole pipeline ------------------------------------------------------------------

TINY = deep_merge(TINY_PIPELINE, {"tokenizer": {"vocab_size": 512}, "export": {"register_model": True, "genai": False}})


def ran_stages(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", result.stdout + result.stderr))


def test_full_pipeline_checkpoints_metrics_plots_and_experiments(dvc_repo, repo_root):
    repo, run = dvc_repo
    for name in ("config", "offline_plots.html"):  # the project's DVC settings: offline plots
        shutil.copy2(repo_root / ".dvc" / name, repo / ".dvc" / name)
    write_params(repo, TINY)
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "tiny pipeline")

    # 1. `dvc repro` builds every stage, one evaluate and export per listed checkpoint.
    first = run("dvc", "repro")
    per_step = {f"{stage}@{step}" for stage in ("evaluate", "export") for step in (10, 20)}
    assert ran_stages(first) == {"download", "tokenize", "train", "report"} | per_step
    for step in (10, 20):
        assert (repo / "models" / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()
        assert (repo / "models" / "export" / f"step-{step}" / "model.onnx").is_file()
    assert (repo / "mlflow.db").is_file()  # the default store, inside the repository

    # 2. Nothing changed: nothing runs.
    assert ran_stages(run("dvc", "repro")) == set()

    # 3. `dvc metrics show` has one summary, the same keys whatever the checkpoint steps.
    metrics = json.loads(run("dvc", "metrics", "show", "--json").stdout)
    files = next(iter(metrics.values()))["data"]
    assert list(files) == ["metrics/summary.json"]
    summary = files["metrics/summary.json"]["data"]
    assert summary["final"]["step"] == 20 and summary["final"]["val_bits_per_byte"] > 0
    final = summary["final"]
    assert abs(final["val_perplexity"] - math.exp(final["val_loss"])) < 1e-6 * final["val_perplexity"]

    # 4. `dvc plots show` writes HTML that needs no network (no CDN script).
    run("dvc", "plots", "show", "-o", "plots-html")
    html = (repo / "plots-html" / "index.html").read_text(encoding="utf-8")
    assert "<script" in html and not re.search(r"<script[^>]+src=[\"']https?:", html), html[:2000]
    assert "val_bits_per_byte" in html and "training_curves.png" in html

    # 5. More steps: train continues from the 20-step run's decay start (step 16); step-20 is
    # trained again (a 30-step run is still at its peak there), step-10 is kept as it was.
    kept = snapshot_tree(repo / "models" / "checkpoints" / "step-10")
    evaluated = (repo / "metrics" / "evaluate" / "step-10.json").read_bytes()
    write_params(repo, deep_merge(TINY, {"train": {"max_steps": 30, "checkpoint_steps": [10, 20, 30]}}))
    third = run("dvc", "repro")
    assert ran_stages(third) == {"train", "evaluate@20", "evaluate@30", "export@20", "export@30", "report"}, \
        third.stdout
    assert "decay-start (step 16)" in third.stdout + third.stderr
    assert snapshot_tree(repo / "models" / "checkpoints" / "step-10") == kept
    assert (repo / "metrics" / "evaluate" / "step-10.json").read_bytes() == evaluated
    steps = [int(line.split("\t")[0]) for line in
             (repo / "metrics" / "train_steps.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    assert steps == list(range(1, 31))
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "30 steps")

    # 6. An experiment with one parameter changed reruns only what reads it, and compares.
    experiment = run("dvc", "exp", "run", "-S", "evaluate.batch_size=3", "-n", "eval-batch-3")
    assert ran_stages(experiment) >= {"evaluate@10", "evaluate@20", "evaluate@30"}
    assert "train" not in ran_stages(experiment) and "tokenize" not in ran_stages(experiment)
    shown = run("dvc", "exp", "show", "--json").stdout
    assert "eval-batch-3" in json.dumps(json.loads(shown)), shown[:2000]
    # a dropped checkpoint step: its evaluate and export outputs go, the summary keeps its keys
    write_params(repo, deep_merge(TINY, {"train": {"max_steps": 30, "checkpoint_steps": [10, 30]}}))
    run("dvc", "repro")
    assert not (repo / "models" / "export" / "step-20").exists()
    assert not (repo / "metrics" / "evaluate" / "step-20.json").exists()
    assert not (repo / "models" / "checkpoints" / "step-20").exists()
    diff = json.loads(run("dvc", "metrics", "diff", "--all", "--json").stdout)  # --all: unchanged too
    assert "final.val_bits_per_byte" in diff["metrics/summary.json"]


def test_pull_instead_of_rebuild_and_byte_identical_rebuild(dvc_repo, repo_root, tmp_path):
    """A DVC remote carries the outputs; a rebuild from scratch gives the same bytes, compiled too."""
    repo, run = dvc_repo
    # the default training path: torch.compile (where g++ is) and bf16 where the CPU has it
    write_params(repo, deep_merge(TINY, {"train": {"compile": "auto", "precision": "auto"}}))
    run("dvc", "repro")
    remote = tmp_path / "remote"
    run("dvc", "remote", "add", "-d", "shared", str(remote))
    run("dvc", "push")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "built")
    lock = (repo / "dvc.lock").read_bytes()

    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(repo), str(clone))

    def in_clone(*args: str) -> subprocess.CompletedProcess:
        env = subprocess_env(PYTHONPATH=str(clone / "src"), DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"))
        result = subprocess.run(args, cwd=clone, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
        return result

    in_clone("dvc", "pull")
    assert "up to date" in in_clone("dvc", "status").stdout
    assert ran_stages(in_clone("dvc", "repro")) == set()
    generated = in_clone(sys.executable, "-m", "openllm", "generate", "--model", "models/export/step-20",
                         "--temperature", "0", "--max-new-tokens", "5", "Ka")
    assert generated.stdout.startswith("Ka") and len(generated.stdout.strip()) > 2

    # Rebuild everything from nothing in the clone: the same bytes, so dvc.lock does not change.
    for folder in ("data/raw", "data/tokenized", "models/checkpoints", "models/export", "metrics"):
        shutil.rmtree(clone / folder, ignore_errors=True)
    rebuilt = in_clone("dvc", "repro", "--force")
    assert "train" in ran_stages(rebuilt)
    assert (clone / "dvc.lock").read_bytes() == lock
