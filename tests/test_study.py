"""The budget study (studies/budget): its settings, budget arithmetic, power-law fit, and a real
``dvc repro`` of its pipeline in a throwaway git repository (cached cells, MLflow child runs)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT, corpus_text, snapshot_tree, subprocess_env, write_params
from openllm.closure import closure, imported_modules
from openllm.model import GPT
from openllm.fileio import write_json
from openllm.study import (Cell, StudyError, budget_steps, collect_results, fit_power_law, grid_cells, load_study,
                           model_config, parse_levers, run_cell, study_fits, train_config)

STUDY = REPO_ROOT / "studies" / "budget"


def table_stage():
    """The table stage's script (studies/budget/table.py) as a module."""
    spec = importlib.util.spec_from_file_location("budget_table", STUDY / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Two cells of a 1-layer model: 0.0004 TFLOPs buy each about 20 steps of 4 windows of 32 tokens.
TINY_STUDY = {
    "model": {"context_length": 32, "head_dim": 16, "mlp_ratio": 2.0},
    "train": {"warmup_steps": 2, "compile": "false", "device": "cpu", "precision": "fp32", "seed": 7},
    "min_lr_ratio": 0.1,
    "score": {"batch_size": 8, "max_tokens": 3000},
    "grid": {"tflops": [0.0004], "n_layer": [1], "n_embd": [16, 32], "optimizer": ["muon"],
             "learning_rate": [0.004], "schedule": ["wsd"], "batch_size": [4], "levers": []},
    "mlflow": {"experiment": "studies-test", "study": "tiny"},
}


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


# --- settings and arithmetic ------------------------------------------------------------------


@pytest.mark.parametrize("name, vocab", [("params.yaml", 4096), ("params.gpu.yaml", 32000),
                                         ("params.levers.yaml", 4096)])
def test_shipped_grids_can_train_every_cell(name: str, vocab: int) -> None:
    study = load_study(STUDY / name)
    for cell in grid_cells(study.grid):
        config = model_config(study, cell, vocab)
        steps = budget_steps(cell, GPT(config).estimate_flops_per_token(), config.context_length)
        assert train_config(study, cell, steps).max_steps == steps > study.train["warmup_steps"]


def test_budget_buys_whole_steps_within_the_budget() -> None:
    cell = Cell(tflops=6, n_layer=4, n_embd=128, optimizer="muon", learning_rate=0.004, schedule="wsd", batch_size=8)
    flops_per_step = 9_542_400 * 8 * 256
    steps = budget_steps(cell, 9_542_400, 256)
    assert steps * flops_per_step <= 6e12 < (steps + 1) * flops_per_step
    assert cell.name == "6-4-128-muon-0.004-wsd-8"


@pytest.mark.parametrize("change, message", [
    ({"grid": {**TINY_STUDY["grid"], "n_layer": [0]}}, "grid.n_layer.0=0"),
    ({"grid": {**TINY_STUDY["grid"], "schedule": ["linear"]}}, "grid.schedule.0='linear'"),
    ({"grid": {**TINY_STUDY["grid"], "learning_rate": ["1e-3"]}},  # YAML 1.1 reads 1e-3 as a string
     "grid.learning_rate.0='1e-3': Input should be a valid number"),
    ({"train": {"learning_rate": 0.01}}, "train.learning_rate is set per cell"),
    ({"grid": {**TINY_STUDY["grid"], "tflops": [1e-6]}}, "raise grid.tflops"),
    ({"grid": {**TINY_STUDY["grid"], "n_embd": [24]}}, "n_embd=24 must be a multiple of model.head_dim=16"),
    ({"train": {"weight_decay": -1}}, "train.weight_decay=-1"),
    ({"train": {"warmup_steps": "many"}}, "train.warmup_steps='many'"),
    ({"model": {"context_length": 32, "head_dim": 15, "mlp_ratio": 2.0},
      "grid": {**TINY_STUDY["grid"], "n_embd": [30]}}, "(head size) must be even"),
    ({"gird": {}}, "gird="),
    ({"grid": {k: v for k, v in TINY_STUDY["grid"].items() if k != "levers"}}, "grid.levers: Field required"),
    ({"grid": {**TINY_STUDY["grid"], "levers": ["dropout=0.1"]}}, "unknown lever 'dropout'"),
    ({"grid": {**TINY_STUDY["grid"], "levers": ["mlp=gelu"]}}, "'mlp=gelu': mlp='gelu'"),
    ({"grid": {**TINY_STUDY["grid"], "levers": ["ema_decay=1"]}}, "'ema_decay=1': ema_decay=1"),
    ({"grid": {**TINY_STUDY["grid"], "levers": ["qk_norm", "qk_norm"]}}, "lists a setting twice"),
    ({"train": {"ema_decay": 0.9}}, "train.ema_decay is set per cell"),
])
def test_bad_settings_fail_with_one_line_naming_the_field(tmp_path: Path, change: dict, message: str) -> None:
    path = write_study(tmp_path / "params.yaml", TINY_STUDY | change)
    with pytest.raises(StudyError) as error:
        study = load_study(path)
        for cell in grid_cells(study.grid):
            config = model_config(study, cell, 400)
            train_config(study, cell, budget_steps(cell, GPT(config).estimate_flops_per_token(), 32))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_levers_add_cells_and_leave_the_other_cells_as_they_were(tmp_path: Path) -> None:
    plain = load_study(write_study(tmp_path / "plain.yaml", TINY_STUDY))
    spec = "qk_norm+logit_softcap=15+mlp=relu2+value_embeds+ema_decay=0.999+window_start=document+seed=8"
    levers = load_study(write_study(tmp_path / "levers.yaml", TINY_STUDY | {
        "grid": {**TINY_STUDY["grid"], "levers": ["qk_norm", spec]}}))
    cells = grid_cells(levers.grid)
    assert cells[:2] == grid_cells(plain.grid)  # the lever-free cells keep their names and values
    assert [c.name for c in cells[2:]] == [f"0.0004-1-{w}-muon-0.004-wsd-4-{s}" for w in (16, 32) for s in ("qk_norm", spec)]
    assert "levers" not in cells[0].to_dict() and cells[3].to_dict()["levers"] == spec
    assert parse_levers(spec) == {"model": {"qk_norm": True, "logit_softcap": 15, "mlp": "relu2", "value_embeds": True},
                                  "train": {"ema_decay": 0.999, "window_start": "document", "seed": 8}}
    config = model_config(levers, cells[3], 400)
    assert (config.qk_norm, config.logit_softcap, config.mlp, config.value_embeds) == (True, 15, "relu2", True)
    assert model_config(levers, cells[0], 400) == model_config(plain, cells[0], 400)
    train = train_config(levers, cells[3], 20)
    assert (train.ema_decay, train.window_start, train.seed) == (0.999, "document", 8)  # the cell's seed wins
    assert train_config(levers, cells[0], 20) == train_config(plain, cells[0], 20)
    assert train_config(levers, cells[0], 20).seed == 7


def test_power_law_fits_a_power_law_and_nothing_else() -> None:
    x = [1e5, 3e5, 1e6, 3e6]
    fit = fit_power_law(x, [3.0 * v**-0.1 for v in x])
    assert fit is not None and math.isclose(fit["b"], -0.1, rel_tol=1e-9) and math.isclose(fit["a"], 3.0)
    assert fit_power_law(x[:2], [2.0, 1.9]) is None  # two points always "fit"
    assert fit_power_law(x, [2.0, 1.5, 1.5, 2.0]) is None  # a valley (too many parameters for the budget)


def test_table_keeps_the_grids_cells_and_puts_diverged_ones_last(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path / "params.yaml", TINY_STUDY))
    small, large = grid_cells(study.grid)
    gone = Cell(0.0004, 2, 16, "muon", 0.004, "wsd", 4)  # a cell the grid no longer has
    for cell, bits in ((small, None), (large, 3.5), (gone, 1.0)):
        write_json(tmp_path / "cells" / f"{cell.name}.json", {
            "cell": cell.__dict__, "name": cell.name, "parameters": cell.n_embd * 100, "steps": 20, "tokens": 2560,
            "train_flops": 3.9e8, "val_bits_per_byte": bits, "val_protocol": {"window": 32, "stride": 32,
                                                                             "tokens": "all"}})
    rows = collect_results(tmp_path / "cells", [small, large])
    table = table_stage().table_markdown(rows, study_fits(rows))
    assert gone.name not in table and table.index(large.name) < table.index(small.name)
    assert f"| {small.name} |" in table and "| diverged |" in table
    with pytest.raises(StudyError, match="run the cell's stage"):
        collect_results(tmp_path / "cells", [Cell(1, 1, 16, "muon", 0.004, "wsd", 4)])


def test_a_cell_trains_the_same_on_a_rerun(tmp_path: Path) -> None:
    """What DVC caches must be what a rerun would write: two runs, identical results."""
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"doc{i}.txt").write_text(corpus_text(i, 500), encoding="utf-8")
    write_params(tmp_path, {"data": {"source": "files", "folder": "corpus", "files": {"glob": "corpus/*.txt"},
                                     "validation_fraction": 0.3}, "tokenizer": {"vocab_size": 400, "workers": 1}})
    for stage in ("download", "tokenize"):
        subprocess.run([sys.executable, "-m", f"openllm.stages.{stage}"], cwd=tmp_path, env=subprocess_env(),
                       check=True, capture_output=True)
    study = load_study(write_study(tmp_path / "study.yaml", TINY_STUDY))
    cell = grid_cells(study.grid)[0]
    (first, timings), (second, _) = (run_cell(study, cell, tmp_path / "data" / "tokenized") for _ in range(2))
    assert first == second and first["steps"] > 2 and not first["diverged"] and timings["train_seconds"] > 0
    # every lever at once: its own result, also the same on a rerun
    levers = Cell(**cell.to_dict(), levers="qk_norm+logit_softcap=15+mlp=relu2+ema_decay=0.9+window_start=document")
    (third, _), (fourth, _) = (run_cell(study, levers, tmp_path / "data" / "tokenized") for _ in range(2))
    assert third == fourth and third["cell"]["levers"] == levers.levers and third["model"]["mlp"] == "relu2"
    assert third["val_bits_per_byte"] != first["val_bits_per_byte"] and third["parameters"] < first["parameters"]
    # score.sliding_stride adds the overlapping-window figure and its protocol; training is unchanged
    sliding = load_study(write_study(tmp_path / "sliding.yaml", TINY_STUDY | {
        "score": {**TINY_STUDY["score"], "sliding_stride": 0.5}}))
    fifth, _ = run_cell(sliding, cell, tmp_path / "data" / "tokenized")
    assert fifth["val_bits_per_byte"] == first["val_bits_per_byte"] and "val_bits_per_byte_sliding" not in first
    assert fifth["val_sliding_protocol"] == fifth["val_protocol"] | {"stride": 16}
    assert math.isfinite(fifth["val_bits_per_byte_sliding"])
    assert fifth["val_bits_per_byte_sliding"] != fifth["val_bits_per_byte"]
    table = table_stage().table_markdown([first, fifth], study_fits([first, fifth]))
    assert f"| {fifth['val_bits_per_byte_sliding']:.4f} |" in table and "| – |" in table
    assert "windows of 32 tokens, stride 16, every token scored once with at least 16 tokens before it" in table


@pytest.mark.parametrize("stage, script", [("cell", "cell"), ("lever", "cell"), ("table", "table")])
def test_study_deps_equal_the_scripts_import_closure(stage: str, script: str) -> None:
    spec = yaml.safe_load((STUDY / "dvc.yaml").read_text())["stages"][stage]
    needed = {Path("../..") / path for module in imported_modules(STUDY / f"{script}.py", script)
              for path in closure(module)}
    declared = {Path(d) for d in spec["deps"] if d.startswith("../../src/")}
    assert declared == needed, f"add {sorted(map(str, needed - declared))}; remove {sorted(map(str, declared - needed))}"


# --- the pipeline, for real ------------------------------------------------------------------


@pytest.fixture
def study_repo(tmp_path):
    """A git + DVC repository: the main pipeline (tiny corpus and tokenizer) and the study folder."""
    repo = tmp_path / "repo"
    (repo / "corpus").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO_ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", "cell.py", "table.py"):
        (repo / "studies" / "budget").mkdir(parents=True, exist_ok=True)
        shutil.copy2(STUDY / name, repo / "studies" / "budget" / name)
    write_study(repo / "studies" / "budget" / "params.yaml", TINY_STUDY)
    for i in range(6):
        (repo / "corpus" / f"doc{i}.txt").write_text(corpus_text(i, 600), encoding="utf-8")
    write_params(repo, {"data": {"source": "files", "folder": "corpus", "files": {"glob": "corpus/*.txt"},
                                 "validation_fraction": 0.3},
                        "tokenizer": {"vocab_size": 400, "workers": 1}})
    env = subprocess_env(PYTHONPATH=str(repo / "src"), DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"),
                         MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
                         GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                         GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com", GIT_CONFIG_NOSYSTEM="1")

    def run(*args: str) -> str:
        result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "study under test")
    return repo, run, tmp_path / "mlflow.db"


def ran_cells(output: str) -> set[str]:
    return {line.split("cell@")[1].split("'")[0] for line in output.splitlines()
            if line.startswith("Running stage") and "cell@" in line}


def test_study_pipeline_caches_each_cell(study_repo) -> None:
    repo, run, database = study_repo
    study_dir = repo / "studies" / "budget"
    cells_dir = study_dir / "results" / "cells"
    first, second = "0.0004-1-16-muon-0.004-wsd-4", "0.0004-1-32-muon-0.004-wsd-4"

    # 1. The first run builds the data, both cells and the table.
    output = run("dvc", "repro", "studies/budget/dvc.yaml")
    assert ran_cells(output) == {first, second}
    for name in (first, second):
        result = json.loads((cells_dir / f"{name}.json").read_text())
        steps_flops = result["flops_per_token"] * 4 * 32
        assert result["steps"] == int(0.0004e12 // steps_flops) > 2 and result["tokens"] == result["steps"] * 128
        assert result["train_flops"] <= result["budget_flops"] < result["train_flops"] + steps_flops
        assert 0 < result["val_bits_per_byte"] < 20 and result["val_protocol"] == {
            "window": 32, "stride": 32, "tokens": "first 3000"}
    table = (study_dir / "results" / "table.md").read_text()
    assert first in table and second in table and "consecutive windows of 32 tokens, stride 32" in table
    assert {p.name for p in (study_dir / "results" / "plots").iterdir()} == {"bpb_vs_parameters.png",
                                                                             "bpb_vs_compute.png"}

    shown = run("dvc", "metrics", "show", *(f"studies/budget/results/cells/{n}.json" for n in (first, second)))
    assert all(f"cells/{n}.json" in shown for n in (first, second)) and "val_bits_per_byte" in shown

    # 2. A rerun runs nothing and leaves every result as it was.
    before = snapshot_tree(study_dir / "results")
    assert "Running stage" not in run("dvc", "repro", "studies/budget/dvc.yaml")
    assert snapshot_tree(study_dir / "results") == before

    # 3. A third cell runs alone (and the table); the first two stay untouched.
    study = TINY_STUDY | {"grid": {**TINY_STUDY["grid"], "n_embd": [16, 32, 48]}}
    write_study(study_dir / "params.yaml", study)
    third = "0.0004-1-48-muon-0.004-wsd-4"
    output = run("dvc", "repro", "studies/budget/dvc.yaml")
    assert ran_cells(output) == {third} and "Running stage 'studies/budget/dvc.yaml:table'" in output
    for name in (first, second):
        path = f"cells/{name}.json"
        assert snapshot_tree(study_dir / "results")[path] == before[path]
    assert third in (study_dir / "results" / "table.md").read_text()

    # Every cell is a child run of the one study run, which holds the table and plots.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("studies-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {first, second, third}
    assert children[third].data.metrics["train_seconds"] > 0
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"table.md", "bpb_vs_parameters.png", "bpb_vs_compute.png"} <= artifacts

    # 4. Levers add their own stages; every lever-free cell stays untouched.
    results = {k: v for k, v in snapshot_tree(study_dir / "results" / "cells").items() if k.endswith(".json")}
    write_study(study_dir / "params.yaml", study | {"grid": {**study["grid"], "n_embd": [16], "levers": ["qk_norm"]}})
    output = run("dvc", "repro", "studies/budget/dvc.yaml")
    lever = f"{first}-qk_norm"
    assert ran_cells(output) == set() and f"Running stage 'studies/budget/dvc.yaml:lever@{lever}'" in output
    assert {k: v for k, v in snapshot_tree(study_dir / "results" / "cells").items() if k in results} == results
    result = json.loads((cells_dir / f"{lever}.json").read_text())
    assert result["cell"]["levers"] == "qk_norm" and result["model"]["qk_norm"] is True
    assert lever in (study_dir / "results" / "table.md").read_text()
