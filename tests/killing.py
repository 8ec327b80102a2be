"""Killing a Ray worker in the middle of a task, for the tests that Ray retries it and the output is unchanged.

The task to kill, on its first run, calls `wait_to_be_killed(mark)` on its worker: it leaves the worker's pid in
`mark` and sleeps; `kill_when_marked(mark)`, started on the driver before the run, kills that pid."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def wait_to_be_killed(mark: Path) -> None:
    mark.write_text(str(os.getpid()))
    time.sleep(120)


def kill_when_marked(mark: Path) -> tuple[threading.Thread, list[int]]:
    """A started thread that kills the process whose pid `mark` receives, and the list it puts that pid in."""
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while not (mark.exists() and mark.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed.append(int(mark.read_text()))
        os.kill(killed[0], signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread, killed
