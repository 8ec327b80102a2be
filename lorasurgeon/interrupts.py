"""Interrupts (Ctrl-C's SIGINT, SIGTERM, SIGHUP): a run they stop ends with exit code 130 and one line.

While a command runs, the CLI turns them into KeyboardInterrupt (`unwind`), so that the writer removes its
temporary on the way out. Before that (while the entry point imports the CLI and its libraries) there is
nothing to clean up: `exit_at_once` makes them end the process there and then. So does an interrupt during an
import in a process started by the entry point: a KeyboardInterrupt raised inside `import torch` reaches its
C++ initialisation, which aborts the process (std::terminate) or leaves the interpreter to kill itself with
the signal, and no temporary exists while the libraries are imported. The writer holds interrupts back
(`held`) while it publishes OUT or removes its temporary, so neither is ever cut in half; they take effect
right after. `committed` lists the outputs published in this process, so the message says what was written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_CODE = 130
committed: list[Path] = []


def message(since: int = 0) -> str:
    """What an interrupt leaves: nothing, or the outputs committed after `committed[since]`."""
    done = committed[since:]
    if not done:
        return "interrupted; nothing was written"
    return f"interrupted after {', '.join(map(str, done))} was written completely"


_whole_process = threading.Event()  # set once the entry point has taken interrupts in hand


def exit_at_once() -> None:
    """From now on (until someone installs other handlers), an interrupt prints its one line and exits 130."""
    _whole_process.set()
    for signum in SIGNALS:
        signal.signal(signum, _exit_now)


def unwind(signum: int, frame: FrameType | None) -> None:
    """The handler while a command runs: KeyboardInterrupt, so every `with` block cleans up on the way out;
    in a process of the entry point's, during an import, the process ends at once instead (see above)."""
    if _whole_process.is_set() and _importing(frame):
        _exit_now(signum, frame)
    raise KeyboardInterrupt


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def ignore() -> None:
    """The command has ended and said so: an interrupt during interpreter shutdown changes nothing."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def after_command(handler: Any) -> Any:
    """The handler to restore once a command has ended: the one it found, except that the entry point's
    `exit_at_once` gives way to `ignore` (the command has answered; a late Ctrl-C changes nothing)."""
    return signal.SIG_IGN if handler is _exit_now else handler


def _exit_now(signum: int, frame: FrameType | None) -> None:
    # On a terminal, show the cursor again (a progress bar hides it) and leave the bar's line first.
    restore = b"\x1b[?25h\n" if os.isatty(2) else b""
    os.write(2, restore + f"Error: {message()}\n".encode())
    os._exit(EXIT_CODE)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold interrupts back for the block (main thread only; elsewhere a no-op), then deliver them to the
    handlers that were in place, as if they had arrived just after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda s, f: pending.append(s)) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for held_signum in dict.fromkeys(pending):
            signal.raise_signal(held_signum)
