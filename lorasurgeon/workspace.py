"""A merge's working memory and compute threads, reused from tensor to tensor.

Profiled on the 2-core VM (a warm 1.56 GiB bf16 merge): a fresh buffer per tensor read and per tensor
merged cost ~390,000 page faults (each 4 KiB page zeroed by the kernel, then overwritten) and 0.7 s of system
time; and the merge's compute ran on one core while the other mostly waited for the reader and writer
threads. Here the base tensors are read into a ring of READ_SLOTS buffers and merged into a ring of OUT_SLOTS,
allocated once at the largest size seen, and a CPU merge shares each tensor's blocks out to `parts` threads.

Why the rings are safe (surgery.execute): the base tensor of computed step i + 1 is read ahead while step i is
computed, and step i's result is handed to a shard stream that keeps at most one write pending. A read slot is
refilled three read-aheads later and an output slot two results later, by which time the stream has written
whatever the earlier step's result was, even a result that is its read buffer itself (an fp32 base whose
merge fell back to the whole-tensor route).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import torch

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.header import TensorInfo

READ_SLOTS, OUT_SLOTS = 3, 2
SLOT_LIMIT = 256 << 20  # larger tensors get a buffer of their own, freed when written (never held twice)
MAX_PARTS = 4  # compute threads of a CPU merge: its blocks stay cache-sized, so more cores add little


class Workspace:
    """Buffers and threads for one merge; use as a context manager (the threads stop on exit)."""

    def __init__(self, device: torch.device, parts: int | None = None) -> None:
        self.device = device
        self.parts = parts if parts is not None else min(MAX_PARTS, os.cpu_count() or 1)
        self._reads = _Ring(READ_SLOTS)
        self._outs = _Ring(OUT_SLOTS)
        cpu = device.type == "cpu" and self.parts > 1
        self._pool = ThreadPoolExecutor(self.parts, thread_name_prefix="lorasurgeon-merge") if cpu else None

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def parallel(self) -> Callable[..., Iterable[bool]] | None:
        """A map over the compute threads (None: compute in the calling thread)."""
        return self._pool.map if self._pool is not None else None

    def read(self, source: Checkpoint, info: TensorInfo) -> torch.Tensor:
        """`info`'s tensor from `source`, in the next read slot."""
        return source.read(info, into=self._reads.next(info.nbytes))

    def output(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The next output slot, shaped like `like` in `dtype`; None on another device or above SLOT_LIMIT."""
        nbytes = like.numel() * dtype.itemsize
        if like.device != torch.device("cpu") or nbytes > SLOT_LIMIT:
            return None
        slot = self._outs.next(nbytes)
        return slot[:nbytes].view(dtype).view(like.shape) if slot is not None else None


class _Ring:
    """`size` byte buffers handed out in turn, each grown to the largest request it has served."""

    def __init__(self, size: int) -> None:
        self._slots: list[torch.Tensor | None] = [None] * size
        self._turn = 0

    def next(self, nbytes: int) -> torch.Tensor | None:
        if nbytes > SLOT_LIMIT or nbytes == 0:
            return None
        index = self._turn
        self._turn = (index + 1) % len(self._slots)
        slot = self._slots[index]
        if slot is None or slot.numel() < nbytes:
            self._slots[index] = slot = None  # the old one is freed before the larger one is allocated
            slot = self._slots[index] = torch.empty(nbytes, dtype=torch.uint8)
        return slot
