"""Stopping a whole process tree: start it as its own session, then signal its process group.

A child started with ``start_new_session=True`` leads a new session and process group, and
everything it starts stays in that group unless it asks otherwise (``dvc repro`` -> the
stage's shell -> ``python -m openllm train``). Ending the group ends them all, even when the
leader has already exited and left its children behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

# What Ctrl-C in a terminal sends: DVC waits for its stage, which saves and exits; then harder.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def group_alive(process: subprocess.Popen) -> bool:
    """True while any process of the group that ``process`` leads is still running."""
    process.poll()  # reap the leader, or it would count as a member while a zombie
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(process: subprocess.Popen, grace: float = 15.0, later: float = 5.0) -> list[str]:
    """End the group ``process`` leads: SIGINT, then SIGTERM after ``grace`` s, SIGKILL after ``later`` s.

    Returns the names of the signals sent (empty when the group was already gone).
    """
    sent = []
    for sig, wait in zip(STOP_SIGNALS, (grace, later, later)):
        if not group_alive(process):
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        sent.append(sig.name)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(process):
            time.sleep(0.1)
    return sent
