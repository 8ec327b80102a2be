"""Reading the base tensor of the next computed step on a worker thread while the current one is computed
(surgery.execute overlaps this read, the computation and the previous tensor's write)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lorasurgeon.plan import Plan, Step
from lorasurgeon.workspace import Workspace

READ_AHEAD_BYTES = 256 << 20


def computed(step: Step) -> bool:
    """Whether the step's tensor is computed (and rounded), rather than copied byte for byte."""
    return step.touched or step.quantized is not None or step.out_dtype != step.tensor.dtype


class ReadAhead:
    """Reads the base tensor of the next computed step on a worker thread while the current one is computed.

    Only tensors of up to READ_AHEAD_BYTES are read ahead, so a huge one (an embedding) never sits in memory
    beside another; they, and steps that start from an adapter's tensor, are read when their turn comes.
    """

    def __init__(self, plan: Plan, workspace: Workspace) -> None:
        self._plan = plan
        self._workspace = workspace  # reads go into its ring of buffers
        self._pending: tuple[Step, Future[torch.Tensor]] | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasurgeon-reader")
        # id(step) -> the first later step to read ahead, or None
        self._following: dict[int, Step | None] = {}
        upcoming = None
        for step in reversed(plan.steps):
            self._following[id(step)] = upcoming
            if computed(step) and _base_start(step) and step.tensor.nbytes <= READ_AHEAD_BYTES:
                upcoming = step

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)

    def take(self, step: Step) -> torch.Tensor | None:
        """`step`'s base tensor if it was read ahead (else None); starts reading the next one."""
        weight = None
        if self._pending is not None and self._pending[0] is step:
            weight = self._pending[1].result()
            self._pending = None
        upcoming = self._following[id(step)]
        if self._pending is None and upcoming is not None:
            self._pending = (upcoming, self._reader.submit(self._workspace.read, self._plan.base, upcoming.tensor))
        return weight


def _base_start(step: Step) -> bool:
    return step.replacement is None and not step.rows and step.quantized is None
