"""dvc.yaml tells the truth: each stage depends on exactly the project files it runs.

A stage runs ``python -m openllm.stages.<name>``; its import closure (every ``openllm`` module
reachable through ``import`` statements, lazy imports inside functions included, plus the
package ``__init__`` files on the way) must equal the ``src/`` files in its ``deps``. A new
import that dvc.yaml does not list fails here, with the lines to add.

The price of per-file deps is that a docstring edit in, say, model.py reruns training; the
price of depending on the whole package would be that an edit to the server reruns it too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT

SRC = REPO_ROOT / "src"


def module_file(name: str) -> Path | None:
    """The file of an ``openllm`` module (or package), else None."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """``openllm`` modules that ``path`` (module ``module``) imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "openllm")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "openllm":
                target = node.module
            else:
                continue
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if module_file(f"{target}.{alias.name}"))
    return found


def closure(module: str) -> set[Path]:
    """Every project file that running ``module`` may load."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way are imported first
            prefix = ".".join(parts[:i])
            if prefix not in seen and module_file(prefix):
                seen.add(prefix)
                todo.extend(imported_modules(module_file(prefix), prefix))
    return {module_file(name).relative_to(REPO_ROOT) for name in seen}


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
