"""Reading the base tensor of the next computed step (or the stored parts of the next quantized weight) on a
worker thread while the current one is computed (surgery.execute overlaps this read, the computation and the
previous tensor's write)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.plan import Plan, Step
from lorasurgeon.quantized import QuantizedWeight
from lorasurgeon.workspace import Workspace

READ_AHEAD_BYTES = 256 << 20
Parts = dict[str, torch.Tensor]  # a quantized weight's stored tensors by local name (QuantizedWeight.parts)


def computed(step: Step) -> bool:
    """Whether the step's tensor is computed (and rounded), rather than copied byte for byte."""
    return step.touched or step.quantized is not None or step.out_dtype != step.tensor.dtype


class ReadAhead:
    """Reads the base tensor of the next computed step on a worker thread while the current one is computed; for a
    quantized weight, its stored parts (lorasurgeon.quantized_steps), at the first of its steps.

    Only tensors (a weight's parts: together) of up to READ_AHEAD_BYTES are read ahead, so a huge one (an
    embedding) never sits in memory beside another; they, and steps that start from an adapter's tensor, are
    read when their turn comes.
    """

    def __init__(self, plan: Plan, workspace: Workspace) -> None:
        self._plan = plan
        self._workspace = workspace  # reads go into its ring of buffers
        self._pending: tuple[Step, Future[torch.Tensor | Parts]] | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasurgeon-reader")
        # id(step) -> the first later step to read ahead, or None
        self._following: dict[int, Step | None] = {}
        readable = {id(step) for step in _first_parts(plan.steps)}
        upcoming = None
        for step in reversed(plan.steps):
            self._following[id(step)] = upcoming
            starts = _base_start(step) or id(step) in readable
            if computed(step) and starts and self._nbytes(step) <= READ_AHEAD_BYTES:
                upcoming = step

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)

    def take(self, step: Step) -> torch.Tensor | None:
        """`step`'s base tensor if it was read ahead (else None); starts reading the next one."""
        read = self._take(step)
        assert not isinstance(read, dict)
        return read

    def take_parts(self, step: Step) -> Parts | None:
        """The stored parts of quantized `step`'s weight if they were read ahead (else None); starts reading the
        next one."""
        read = self._take(step)
        assert read is None or isinstance(read, dict)
        return read

    def _take(self, step: Step) -> torch.Tensor | Parts | None:
        read = None
        if self._pending is not None and self._pending[0] is step:
            read = self._pending[1].result()
            self._pending = None
        upcoming = self._following[id(step)]
        if self._pending is None and upcoming is not None:
            self._pending = (upcoming, self._reader.submit(self._read, upcoming))
        return read

    def _read(self, step: Step) -> torch.Tensor | Parts:
        base = self._plan.base
        if step.quantized is None:
            return self._workspace.read(base, step.tensor)
        return read_parts(base, step.quantized.weight)

    def _nbytes(self, step: Step) -> int:
        if step.quantized is None:
            return step.tensor.nbytes
        return sum(self._plan.base.tensors[stored].nbytes for stored in step.quantized.weight.parts.values())


def read_parts(base: Checkpoint, weight: QuantizedWeight) -> Parts:
    """A quantized weight's stored tensors, read from whichever shards hold them."""
    return {local: base.read(base.tensors[stored]) for local, stored in weight.parts.items()}


def _base_start(step: Step) -> bool:
    return step.replacement is None and not step.rows and step.quantized is None


def _first_parts(steps: Sequence[Step]) -> list[Step]:
    """The first step (in the plan's order) of each quantized weight: the one that reads its parts and computes it
    (lorasurgeon.quantized_steps)."""
    firsts: dict[str, Step] = {}
    for step in steps:
        if step.quantized is not None:
            firsts.setdefault(step.quantized.weight.name, step)
    return list(firsts.values())
