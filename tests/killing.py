"""Killing a Ray worker in the middle of a task, for the tests that Ray retries it and the output is unchanged.

`KilledOnce` stands for a command's task function: the first time it runs the victim's step, it leaves its
worker's pid in a mark file and sleeps; `kill_when_marked`, started on the driver before the run, kills that pid,
and Ray's rerun of the step finds the mark and computes. Workers import this module (the tests' folder is on
their PYTHONPATH, tests/conftest.py's ray_cluster), so it is pickled by reference."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class KilledOnce:
    task: Callable[[Any], Any]
    name_of: Callable[[Any], str]  # picklable: a module's function, or operator.attrgetter
    victim: str
    mark: Path

    def __call__(self, step: Any) -> Any:
        if self.name_of(step) == self.victim and not self.mark.exists():
            self.mark.write_text(str(os.getpid()))
            time.sleep(120)
        return self.task(step)


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
