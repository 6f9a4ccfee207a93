"""The documentation site (docs/, mkdocs.yml): it builds, its code links and code blocks work.

The figures are generated from test_app's tiny project (two random checkpoints and their
exports), exactly as `make docs` generates them from the trained ones; the site is built in a
temporary copy so that the repository's docs/generated is never touched.

Code blocks: every ```python block runs (a page's blocks in order, in one interpreter, in the
tiny project). Every ```bash line is checked by what it is: `make` targets with `make -n`,
read-only `dvc` commands run in the repository, `dvc exp run -S` overrides are validated by the
config loader, `openllm generate|score` run on the tiny exports, other programs answer `--help`.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT, VENV_BIN, deep_merge, repo_params, subprocess_env
from openllm.config import parse_params
from test_app import make_project

DOCS = REPO_ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + sorted((DOCS / "chapters").glob("*.md"))
CODE_LINK = re.compile(r"\]\(code:([\w.]+)\)")
BLOCK = re.compile(r"^( *)```(\w+)\n(.*?)^\1```$", re.M | re.S)
DEFAULT_STEP = "step-2400"  # the docs name the default run's last checkpoint; the tiny project has others
READ_ONLY_DVC = {("dag",), ("metrics", "show")}

sys.path.insert(0, str(DOCS))
import hooks  # noqa: E402  (docs/hooks.py, the code-link resolver of the site)


def blocks(page: Path, language: str) -> list[str]:
    """The page's fenced blocks of ``language``, unindented."""
    found = []
    for indent, lang, body in BLOCK.findall(page.read_text(encoding="utf-8")):
        if lang == language:
            found.append("\n".join(line[len(indent):] for line in body.splitlines()))
    return found


@pytest.fixture(scope="session")
def project(session_dir: Path) -> Path:
    return make_project(session_dir / "app-project")  # the folder test_app.py uses too


@pytest.fixture(scope="session")
def site_source(project: Path, tmp_path_factory) -> Path:
    """A copy of mkdocs.yml and docs/ with figures generated from the tiny project."""
    root = tmp_path_factory.mktemp("site")
    shutil.copy(REPO_ROOT / "mkdocs.yml", root)
    shutil.copytree(DOCS, root / "docs", ignore=shutil.ignore_patterns("generated", "__pycache__"))
    done = subprocess.run([sys.executable, "-m", "openllm.docs_figures", "--root", str(project),
                           "--out", str(root / "docs" / "generated")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def mkdocs_build(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "mkdocs"), "build", "--strict"], cwd=root,
                          env=subprocess_env(NO_MKDOCS_2_WARNING="1"), capture_output=True, text=True, timeout=300)


# --- code links -----------------------------------------------------------------------------


def test_every_code_link_names_a_symbol_defined_where_the_link_points() -> None:
    links = {link for page in PAGES for link in CODE_LINK.findall(page.read_text(encoding="utf-8"))}
    assert len(links) > 20
    for link in sorted(links):
        module = importlib.import_module(".".join(link.split(".")[:2]))
        target = module
        for name in link.split(".")[2:]:
            assert hasattr(target, name), f"{link}: {name} does not exist"
            target = getattr(target, name)
        line = hooks.symbol_line(link)
        if inspect.isclass(target) or inspect.isfunction(target):
            source, start = inspect.getsourcelines(target)
            decorators = next(i for i, s in enumerate(source) if not s.lstrip().startswith("@"))
            assert line == start + decorators, f"{link}: the link points at line {line}"
        else:  # a module or a constant: the line must name it
            text = Path(module.__file__).read_text(encoding="utf-8").splitlines()[line - 1]
            assert line == 1 or text.startswith(link.rsplit(".", 1)[1]), f"{link}: line {line} is {text!r}"


def test_a_link_to_a_missing_symbol_fails_the_build(site_source: Path, tmp_path: Path) -> None:
    broken = tmp_path / "site"
    shutil.copytree(site_source, broken)
    page = broken / "docs" / "index.md"
    page.write_text(page.read_text() + "\n[gone](code:openllm.model.NoSuchThing)\n")
    done = mkdocs_build(broken)
    assert done.returncode != 0 and "'NoSuchThing' is not defined" in done.stderr


# --- the build ------------------------------------------------------------------------------


def test_the_site_builds_in_strict_mode_with_generated_figures(site_source: Path) -> None:
    done = mkdocs_build(site_source)
    assert done.returncode == 0, done.stderr[-3000:]
    site = site_source / "site"
    for chapter in sorted((DOCS / "chapters").glob("*.md")):
        assert (site / "chapters" / chapter.stem / "index.html").is_file()
    assert (site / "learning-path" / "index.html").is_file()
    model_page = (site / "chapters" / "03-model" / "index.html").read_text()
    assert "../../generated/attention.png" in model_page and (site / "generated" / "attention.png").is_file()
    parameters = (site_source / "docs" / "generated" / "parameters.md").read_text()
    assert "**33,440**" in parameters  # the tiny model's count, from the code's own formula
    # A code link lands on the line that defines the symbol in the generated source page.
    anchor = re.search(r'href="\.\./\.\./source/openllm/model/#(__codelineno-0-(\d+))"', model_page)
    source = (site / "source" / "openllm" / "model" / "index.html").read_text()
    assert anchor and f'id="{anchor.group(1)}"' in source


def test_missing_figures_stop_the_build_with_the_command_to_run(site_source: Path, tmp_path: Path) -> None:
    bare = tmp_path / "site"
    shutil.copytree(site_source, bare, ignore=shutil.ignore_patterns("generated"))
    done = mkdocs_build(bare)
    assert done.returncode != 0 and "run `make docs`" in done.stderr


def test_export_figures_of_an_int8_export(session_dir: Path, tmp_path: Path) -> None:
    from fixtures_export import build_export
    from openllm import docs_figures
    from openllm.config import load_params

    folder = build_export(session_dir / "docs-int8", quantize=True, huggingface=False)
    project = docs_figures.Project(tmp_path, load_params(REPO_ROOT / "params.yaml"), [], [(10, folder)])
    docs_figures.export_facts(project, tmp_path)
    text = (tmp_path / "export.md").read_text()
    assert "model.int8.onnx`" in text and "The int8 model scores" in text and "% perplexity" in text
    assert "`model.attention.onnx`" in text and "is missing" not in text


def test_figures_need_checkpoints(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path)
    done = subprocess.run([sys.executable, "-m", "openllm.docs_figures", "--root", str(tmp_path),
                           "--out", str(tmp_path / "out")], env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].endswith("run `make run` first")


# --- code blocks ----------------------------------------------------------------------------


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.stem)
def test_python_blocks_run(page: Path, project: Path) -> None:
    code = "\n\n".join(blocks(page, "python"))
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{page.name}:\n{done.stderr[-3000:]}"


def shell_lines() -> list[tuple[str, str]]:
    lines = []
    for page in PAGES:
        for block in blocks(page, "bash"):
            for line in block.splitlines():
                command = line.split(" #", 1)[0].strip()
                if command and not command.startswith("#"):
                    lines.append((page.stem, command))
    return lines


@pytest.mark.parametrize("page, command", shell_lines(), ids=[f"{p}: {c[:40]}" for p, c in shell_lines()])
def test_shell_lines_work(page: str, command: str, project: Path) -> None:
    words = shlex.split(command)
    program = Path(words[0]).name
    if program == "make":
        done = run(["make", "-n", *words[1:]], REPO_ROOT)
    elif program == "dvc" and tuple(words[1:3]) == ("exp", "run"):
        overrides = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
        params = repo_params()
        for override in overrides:
            key, value = override.split("=", 1)
            nested: dict = {}
            node = nested
            *path, last = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[last] = yaml.safe_load(value)
            params = deep_merge(params, nested)
        parse_params(params)  # raises ConfigError naming a bad field
        return
    elif program == "dvc" and tuple(w for w in words[1:] if not w.startswith("-")) in READ_ONLY_DVC:
        done = run(words, REPO_ROOT)
    elif program == "openllm":
        last = sorted((project / "models" / "export").glob("step-*"), key=lambda p: int(p.name[5:]))[-1].name
        done = run([str(VENV_BIN / "openllm"), *[w.replace(DEFAULT_STEP, last) for w in words[1:]]], project)
    else:  # a long-running program (training, a UI): its subcommand must exist
        subcommand = [w for w in words[1:2] if not w.startswith("-")]
        done = run([str(VENV_BIN / program), *subcommand, "--help"], REPO_ROOT)
    assert done.returncode == 0, f"{page}: {command}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"


def run(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(words, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
