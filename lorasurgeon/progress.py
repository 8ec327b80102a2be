"""What a long command tells its progress callback: the phase it is in and, while it streams tensors, how far.

The library never prints; a command reports through `on_progress(Progress(...))` and the caller (the CLI's
progress bar, a notebook, a log) decides what to show. Torch-free, so a command can say it is planning before
it imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# planning: reading headers and adapters, matching them, making the plan (nothing counted yet);
# merging / unmerging / decomposing / comparing / reading: streaming tensors, counted;
# publishing: writing the index, config and companion files, syncing and renaming OUT into place.
Phase = Literal["planning", "merging", "unmerging", "decomposing", "comparing", "reading", "publishing"]
COUNTED: tuple[Phase, ...] = ("merging", "unmerging", "decomposing", "comparing", "reading")


@dataclass(frozen=True)
class Progress:
    """One report: `phase`, and in a counted phase the tensors and tensor bytes done so far out of their totals
    (the totals are those of the phase; they are 0 while planning or publishing, when nothing is counted)."""

    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    phase: Phase = "merging"

    @property
    def counted(self) -> bool:
        return self.phase in COUNTED
