"""DVC commands run by the flows: one dvc.yaml stage as a Prefect task, with its output streamed.

``run_stage`` runs ``dvc repro <stage>``, or ``dvc exp run <stage> -S key=value`` when it is given
parameter overrides, in its own process group, logging each line to Prefect; a failure raises
:class:`StageError` with the stage's last stderr lines.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ops.processes import stop_group

STDERR_TAIL_LINES = 15  # stderr lines quoted in a failed stage's error
STOP_GRACE_SECONDS = 15  # a cancelled stage's time to save and exit after SIGINT (within Prefect's 30 s)

_RUNNING = re.compile(r"Running stage '([^']+)'")
_EXPERIMENT = re.compile(r"Ran experiment\(s\): (\S+)")


class StageError(RuntimeError):
    """A DVC command exited with an error; the message ends with its last stderr lines."""

    def __init__(self, stage: str, returncode: int, stderr_tail: Iterable[str]):
        self.stage, self.returncode = stage, returncode
        tail = "\n".join(stderr_tail) or "(nothing on stderr)"
        super().__init__(f"stage {stage!r} failed (exit status {returncode}):\n{tail}")


def stage_env(root: Path) -> dict[str, str]:
    """The environment for DVC: this venv's bin first on PATH, the repo's ``src`` importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if (root / "src").is_dir():  # run the code that dvc.yaml's deps point at
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "src"), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the logs as they are printed
    env.setdefault("TQDM_MININTERVAL", "30")  # a progress line every 30 s, not a flood
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc_command(stage: str, overrides: dict[str, Any] | None = None, force: bool = False) -> list[str]:
    """``dvc repro STAGE``, or ``dvc exp run STAGE -S key=value...`` when there are overrides.

    ``force`` reruns just this stage even when DVC sees no change. Override values that are not
    strings are written as JSON, which DVC reads as YAML (``true``, ``[10, 20]``, ``null``).
    """
    command = ["dvc", "exp", "run", stage] if overrides else ["dvc", "repro", stage]
    if force:
        command += ["--force", "--single-item"]
    for key, value in (overrides or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        command += ["--set-param", f"{key}={text}"]
    return command


def which_dvc(env: dict[str, str]) -> str:
    """The ``dvc`` program on the PATH of ``env`` (this venv's first)."""
    return shutil.which("dvc", path=env["PATH"]) or "dvc"


def _stream_lines(process: subprocess.Popen[str]) -> Iterator[tuple[str, str]]:
    """Yield ``("stdout" | "stderr", line)`` as the process writes them (one thread per pipe)."""
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def pump(name: str, pipe: Iterable[str]) -> None:
        for line in pipe:  # text mode: "\r" (progress bars) also ends a line
            lines.put((name, line.rstrip("\r\n")))
        lines.put((name, None))

    pipes = (("stdout", process.stdout), ("stderr", process.stderr))
    for name, pipe in pipes:
        threading.Thread(target=pump, args=(name, pipe), daemon=True).start()
    open_pipes = len(pipes)
    while open_pipes:
        name, line = lines.get()
        if line is None:
            open_pipes -= 1
        else:
            yield name, line


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="dvc-{stage}")
def run_stage(
    repo: str, stage: str, overrides: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Run one dvc.yaml stage in ``repo``, streaming its output into the Prefect logs.

    Returns the stages DVC actually ran (none when everything was up to date) and, for
    ``dvc exp run``, the experiment's name. Raises :class:`StageError` when DVC fails.
    """
    logger = get_run_logger()
    root = Path(repo)
    env = stage_env(root)
    command = dvc_command(stage, overrides, force)
    logger.info("$ %s", " ".join(command))
    command[0] = which_dvc(env)
    ran: list[str] = []
    experiment: str | None = None
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    # Its own session: cancelling the flow run (Prefect interrupts this process) ends DVC and
    # every process under it as one group, and a group-wide signal aimed at the flow run's
    # process reaches DVC only through us.
    with subprocess.Popen(
        command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
    ) as process:
        try:
            for name, line in _stream_lines(process):
                if not line.strip():
                    continue
                logger.info("%s", line)
                if name == "stderr":
                    stderr_tail.append(line)
                if match := _RUNNING.search(line):
                    ran.append(match.group(1))
                if match := _EXPERIMENT.search(line):
                    experiment = match.group(1)
            returncode = process.wait()
        except BaseException:  # cancelled (TerminationSignal), interrupted, or a bug above
            logger.warning("stopping %s and its children (process group %d)", command[1:3], process.pid)
            sent = stop_group(process, grace=STOP_GRACE_SECONDS)
            logger.warning("process group %d ended (sent %s)", process.pid, ", ".join(sent) or "nothing")
            raise
        stop_group(process, grace=STOP_GRACE_SECONDS)  # anything DVC's command left running
    if returncode:
        raise StageError(stage, returncode, stderr_tail)
    return {"stage": stage, "ran": ran, "experiment": experiment}


def remove_experiments(root: Path, names: list[str]) -> None:
    """Drop the intermediate experiments of a stage-by-stage ``dvc exp run``.

    Each stage's ``dvc exp run`` records an experiment; the last one holds the whole result.
    """
    env = stage_env(root)
    result = subprocess.run([which_dvc(env), "exp", "remove", *names], cwd=root, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        get_run_logger().warning("could not remove experiments %s: %s", names, result.stderr.strip())


@task(cache_policy=NO_CACHE, persist_result=False)
def download_status(repo: str) -> dict[str, Any]:
    """``dvc status download``: the stage's changed code, params or missing output ({} if none)."""
    root = Path(repo)
    env = stage_env(root)
    result = subprocess.run([which_dvc(env), "status", "download", "--json"], cwd=root, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise StageError("dvc status download", result.returncode, result.stderr.splitlines()[-STDERR_TAIL_LINES:])
    return json.loads(result.stdout or "{}")
