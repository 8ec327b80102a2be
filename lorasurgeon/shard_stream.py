"""ShardStream: one safetensors shard's tensor bytes, written in header order behind the caller (for
lorasurgeon.writer.CheckpointWriter.shard, which writes the header first and fsyncs the file after)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO

from lorasurgeon.checkpoint import Checkpoint, write_all
from lorasurgeon.header import TensorInfo

if TYPE_CHECKING:
    import numpy as np
    import torch


class ShardStream:
    """Takes a shard's tensors in header order, checks each one's size against the header, and writes it
    behind the caller: tensor i is written on a worker thread while the caller computes tensor i + 1 (file
    writes and torch ops both release the GIL). At most one write is pending, so at most one finished tensor
    waits in memory.

    A later tensor that is ready early (an FP8 weight's codes, computed with the scales stored before it) is
    written ahead at its place in the file (`write_ahead`) and passed over with `skip` when its turn comes; the
    file's bytes are the same as if it had been written in order."""

    def __init__(self, f: BinaryIO, names: list[str], sizes: list[int], start: int = 0) -> None:
        """`start` is where the first tensor's bytes begin (after the header)."""
        self.file = f
        self._sizes = sizes
        self._index = {name: i for i, name in enumerate(names)}
        self._offsets = list(itertools.accumulate(sizes, initial=start))
        self._ahead: set[int] = set()
        self._next = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasurgeon-writer")
        self._pending: Future[None] | None = None

    def write(self, tensor: torch.Tensor) -> None:
        data = _bytes_of(tensor)
        self._expect(len(data))
        self._submit(_appending, self.file, write_all, self.file, data.data)

    def copy_from(self, source: Checkpoint, info: TensorInfo) -> None:
        """Append a tensor's bytes unchanged, straight from its source file."""
        self._expect(info.nbytes)
        self._submit(_appending, self.file, source.copy_to, info, self.file)

    def later(self, name: str) -> bool:
        """Whether `name` is a tensor of this shard still to come that has not been written ahead."""
        i = self._index.get(name)
        return i is not None and i >= self._next and i not in self._ahead

    def write_ahead(self, name: str, tensor: torch.Tensor) -> None:
        """Write the later tensor `name` now, at its own offset; the file position is left where it is."""
        if not self.later(name):
            raise RuntimeError(f"writer: {name!r} is not a tensor still to come in this shard")
        i = self._index[name]
        data = _bytes_of(tensor)
        if len(data) != self._sizes[i]:
            raise RuntimeError(f"writer: tensor #{i} does not match the shard header")
        self._ahead.add(i)
        self._submit(_write_at, self.file, data.data, self._offsets[i])

    def written_ahead(self, name: str) -> bool:
        return self._index.get(name, -1) in self._ahead

    def skip(self) -> None:
        """Pass over the next tensor, which was written ahead."""
        if self._next not in self._ahead:
            raise RuntimeError(f"writer: tensor #{self._next} was not written ahead")
        self._next += 1
        self._submit(_seek_to, self.file, self._offsets[self._next])

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._wait()
        self._pending = self._worker.submit(fn, *args)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the worker's OSError here, inside the writer's guard

    def _expect(self, nbytes: int) -> None:
        if self._next >= len(self._sizes) or self._next in self._ahead or nbytes != self._sizes[self._next]:
            raise RuntimeError(f"writer: tensor #{self._next} does not match the shard header")
        self._next += 1

    def finish(self) -> None:
        self._wait()
        if self._next != len(self._sizes):
            raise RuntimeError(f"writer: {len(self._sizes) - self._next} tensors were never written")

    def close(self) -> None:
        """Stop the worker after its current write (on success finish() has already waited for it)."""
        self._worker.shutdown(wait=True, cancel_futures=True)


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    import torch  # here, not at the top: the CLI imports this module before it knows it needs torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _appending(f: BinaryIO, fn: Callable[..., None], *args: Any) -> None:
    """Run `fn`, which appends at the file position, then let the appended pages go (see `_let_go`)."""
    start = f.tell()
    fn(*args)
    _let_go(f, start, f.tell() - start)


def _write_at(f: BinaryIO, data: memoryview, offset: int) -> None:
    """Write every byte at `offset` without moving the file position, then let the pages go (see `_let_go`)."""
    view, at = data.cast("B"), offset
    while view:
        written = os.pwrite(f.fileno(), view, at)
        view, at = view[written:], at + written
    _let_go(f, offset, at - offset)


def _seek_to(f: BinaryIO, offset: int) -> None:
    f.seek(offset)


def _let_go(f: BinaryIO, start: int, length: int) -> None:
    """On Linux, DONTNEED starts writing the range's dirty pages back now (without waiting), so the fsync at the
    end of the shard has little left to do, and the written data does not crowd the page cache."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), start, length, os.POSIX_FADV_DONTNEED)
