"""What every figure of the docs is made from: the project's folders, and the markdown helpers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import list_checkpoints
from ..config import Params, load_params
from ..paths import CHECKPOINTS_DIR, EXPORT_DIR
from ..errors import OpenLLMError

# Romeo and Juliet, act 2, scene 2, as the plays' text spells it.
LINE = "But, soft! what light through yonder window breaks?"
PROMPT = "ROMEO:\nBut, soft! what light through yonder"  # where the sampling chapter looks at the next token


class DocsFiguresError(OpenLLMError):
    """The project has nothing to draw the docs from (no checkpoints, no exports)."""


@dataclass
class Project:
    """What the figures are made from."""

    root: Path
    params: Params
    checkpoints: list[tuple[int, Path]]  # (step, folder), by step
    exports: list[tuple[int, Path]]

    @classmethod
    def open(cls, root: Path) -> Project:
        params = load_params(root / "params.yaml")
        checkpoints = list_checkpoints(root / CHECKPOINTS_DIR)
        exports = list_checkpoints(root / EXPORT_DIR)
        if not checkpoints or not exports:
            raise DocsFiguresError(f"no checkpoints in {root / CHECKPOINTS_DIR} or no exports in {root / EXPORT_DIR}: "
                                   "run `make run` first")
        return cls(root, params, checkpoints, exports)

    def generator(self, index: int = -1):
        from ..runtime import OnnxGenerator

        return OnnxGenerator.load(self.exports[index][1])


def table(header: list[str], rows: list[list[object]], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column (l or r), left by default."""
    align = align or "l" * len(header)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def shown(piece: str) -> str:
    """A token as a table cell: spaces and newlines made visible, markdown characters escaped."""
    text = piece.replace(" ", "␣").replace("\n", "↵")
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
