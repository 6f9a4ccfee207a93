"""dvc.yaml tells the truth: each stage depends on exactly the project files it runs.

A stage runs ``python -m openllm.stages.<name>``; its import closure (every ``openllm`` module
reachable through ``import`` statements, lazy imports inside functions included, plus the
package ``__init__`` files on the way) must equal the ``src/`` files in its ``deps``. A new
import that dvc.yaml does not list fails here, with the lines to add.

The price of per-file deps is that a docstring edit in, say, model.py reruns training; the
price of depending on the whole package would be that an edit to the server reruns it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT
from openllm.closure import closure


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    cmd = (stage.get("do") or stage)["cmd"]
    assert cmd.startswith("python -m openllm.stages."), cmd
    return cmd.split()[2]


def declared_code(stage: dict) -> set[Path]:
    deps = (stage.get("do") or stage).get("deps", [])
    return {Path(d) for d in deps if d.startswith("src/")}


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_equal_its_import_closure(name: str) -> None:
    stage = stages()[name]
    needed, declared = closure(stage_module(stage)), declared_code(stage)
    missing = "".join(f"\n      - {p}" for p in sorted(needed - declared))
    extra = "".join(f"\n      - {p}" for p in sorted(declared - needed))
    assert not missing and not extra, f"dvc.yaml stage {name}: add{missing or ' nothing'}; remove{extra or ' nothing'}"


def test_closure_follows_lazy_and_package_imports() -> None:
    """The checker itself: it sees imports inside functions and package __init__ files."""
    files = {str(p) for p in closure("openllm.stages.report")}
    assert "src/openllm/__init__.py" in files and "src/openllm/stages/__init__.py" in files
    assert "src/openllm/tracking.py" in files  # imported inside report.log_to_mlflow
    assert "src/openllm/model.py" not in files  # the report stage never loads PyTorch code
