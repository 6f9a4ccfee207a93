"""The project files a module runs: its import closure, found by reading the code.

A DVC stage must list every file it runs in ``deps`` (tests/test_dvc_deps.py compares), and the
train stage folds the same files' sha256 into its resume key, so a state trained by other code
is never reused. Imports inside functions count too; so do the package ``__init__`` files on
the way. Only ``openllm`` modules are followed (third-party code is pinned by pyproject.toml).
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]  # the folder holding the openllm package


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
    return {module_file(name).relative_to(SRC.parent) for name in seen}


def code_sha256(module: str) -> str:
    """sha256 over the closure's file names and contents: changes when any file it runs changes."""
    digest = hashlib.sha256()
    for path in sorted(closure(module)):
        digest.update(str(path).encode() + b"\0" + (SRC.parent / path).read_bytes() + b"\0")
    return digest.hexdigest()
