"""The progress bar a person sees on a terminal while a command works (nothing at all when stderr is piped).

It shows what the library's callback says (lorasurgeon.progress): the phase by name while nothing is counted
(planning, publishing), then tensors done of the total and bytes in the units the summaries use, and a time
estimate only once the phase has run long enough to predict the rest: the first tensor is often an embedding or a
slow first SVD, and an estimate from it alone is wrong by orders of magnitude.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Display

from lorasurgeon.progress import Phase, Progress
from lorasurgeon.units import duration, size

ESTIMATE_AFTER_SECONDS = 3.0  # no estimate before the phase has run this long
ESTIMATE_AFTER_SHARE = 0.05  # nor before this share of its bytes is done


@dataclass
class Phased:
    """The bar's state between two reports: the phase shown, its task, and when it began (by the bar's clock)."""

    label: str
    display: Display
    clock: Callable[[], float]
    task: TaskID
    phase: Phase | None = None
    began: float = 0.0

    def show(self, p: Progress) -> None:
        if p.phase != self.phase:  # a new phase: a new task, so the bar and the elapsed time start from zero
            self.display.remove_task(self.task)
            self.phase, self.began = p.phase, self.clock()
            self.task = self.display.add_task(f"{self.label}: {p.phase}", total=None, counts="", estimate="")
        if not p.counted:
            self.display.update(self.task, refresh=True)
            return
        counts = f"{p.tensors_done}/{p.tensors_total} tensors, {size(p.bytes_done)}/{size(p.bytes_total)}"
        self.display.update(
            self.task,
            total=max(p.bytes_total, 1),
            completed=p.bytes_done,
            counts=counts,
            estimate=self.estimate(p.bytes_done, p.bytes_total),
            refresh=True,
        )

    def estimate(self, done: int, total: int) -> str:
        """`about 12 s left`, from the phase's average rate so far; empty until that rate means something."""
        elapsed = self.clock() - self.began
        if elapsed < ESTIMATE_AFTER_SECONDS or done < ESTIMATE_AFTER_SHARE * total or done >= total:
            return ""
        return f"about {duration(elapsed * (total - done) / done)} left"


@contextlib.contextmanager
def progress_bar(
    label: str, console: Console, clock: Callable[[], float] = time.monotonic
) -> Iterator[Callable[[Progress], None] | None]:
    """A callback drawing `label`'s progress on `console` while the block runs, erased at its end; None (the
    library then reports nothing) when `console` is not a terminal. Until the first report, the bar shows the
    label alone, with a spinner and the time so far."""
    if not console.is_terminal:
        yield None
        return
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[estimate]}"),
    )
    with Display(*columns, console=console, transient=True, get_time=clock) as display:
        starting = display.add_task(label, total=None, counts="", estimate="")
        yield Phased(label, display, clock, starting).show
