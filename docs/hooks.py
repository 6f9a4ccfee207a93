"""MkDocs hooks (mkdocs.yml ``hooks:``): code links that cannot rot, and a clear missing-figures error.

- Every module of ``src/openllm`` becomes a page ``source/openllm/<module>.md`` with its code
  and line numbers.
- A link written ``[text](code:openllm.train.learning_rate)`` points at the line where that
  symbol is defined on its module's page. A symbol that does not exist fails the build.
- The pages include figures written by ``python -m openllm.docs_figures`` into
  ``docs/generated``; without them the build stops and says how to make them.
"""

from __future__ import annotations

import ast
import posixpath
import re
from pathlib import Path

import openllm
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

SOURCE = Path(openllm.__file__).resolve().parent  # src/openllm
PAGES = "source/openllm"
CODE_LINK = re.compile(r"\]\(code:([A-Za-z_][\w.]*)\)")


def module_file(dotted: str) -> tuple[Path, list[str]]:
    """``openllm.train.learning_rate`` -> (src/openllm/train.py, ["learning_rate"])."""
    parts = dotted.split(".")
    if parts[0] != "openllm" or len(parts) < 2:
        raise PluginError(f"code link {dotted!r}: it must start with openllm.<module>")
    path = SOURCE / f"{parts[1]}.py"
    if not path.is_file():
        raise PluginError(f"code link {dotted!r}: there is no {path}")
    return path, parts[2:]


def symbol_line(dotted: str) -> int:
    """The line where ``dotted`` (a module, class, function, method or constant) is defined."""
    path, names = module_file(dotted)
    node: ast.AST = ast.parse(path.read_text(encoding="utf-8"))
    line = 1
    for name in names:
        for child in getattr(node, "body", []):
            if _defines(child, name):
                node, line = child, child.lineno
                break
        else:
            raise PluginError(f"code link {dotted!r}: {name!r} is not defined in {path}")
    return line


def _defines(node: ast.AST, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def on_config(config):
    generated = Path(config["docs_dir"]) / "generated"
    if not generated.is_dir():
        raise PluginError(f"{generated} is missing: run `make docs`, which writes the figures "
                          "(python -m openllm.docs_figures) from the trained checkpoints first")
    return config


def on_files(files, config):
    for path in sorted(SOURCE.glob("*.py")):
        code = path.read_text(encoding="utf-8")
        content = (f"# `src/openllm/{path.name}`\n\n"
                   f'````python linenums="1"\n{code}\n````\n')
        files.append(File.generated(config, f"{PAGES}/{path.stem}.md", content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(page.file.src_uri)

    def link(match: re.Match) -> str:
        dotted = match.group(1)
        path, _ = module_file(dotted)
        target = posixpath.relpath(f"{PAGES}/{path.stem}.md", here or ".")
        return f"]({target}#__codelineno-0-{symbol_line(dotted)})"

    return CODE_LINK.sub(link, markdown)


def on_page_content(html, page, config, files):
    # The line anchors come from the highlighter's raw HTML, which MkDocs' anchor check does not
    # see: register them, so that links to them are validated like any other anchor.
    if page.file.src_uri.startswith(PAGES) and page.present_anchor_ids is not None:
        page.present_anchor_ids.update(re.findall(r'id="(__codelineno-[\w-]+)"', html))
    return html
