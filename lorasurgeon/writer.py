"""CheckpointWriter: build OUT in a temporary sibling, stream shards into it, publish it with a rename.

Each shard's header is written first (every tensor's name, dtype and shape is known from the plan), then
tensor bytes are appended in header order, so no shard is ever buffered. Nothing appears at OUT until
every byte is written and fsync'd; an existing OUT (with --force) stays intact until the new one is
complete. Temporaries are named `.<OUT name>.lorasurgeon-tmp-<pid>` so a later run can recognise and remove
those left by a killed run (for a name too long to take the suffix within 255 bytes, its start and a hash of
it stand for the name). Interrupts are held back while OUT is published or the temporary removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from lorasurgeon import interrupts
from lorasurgeon.checkpoint import COPY_CHUNK, write_all
from lorasurgeon.errors import Option, OutputError
from lorasurgeon.header import build_header, nbytes_of
from lorasurgeon.input_file import open_input
from lorasurgeon.shard_stream import ShardStream
from lorasurgeon.temporaries import (
    OLD_SUFFIX,
    TMP_MARK,  # re-exported: other modules recognise temporaries by it
    holds_anything,
    make_folders,
    remove,
    remove_stale_temporaries,
    restore_interrupted_swap,
    take_over_scratch,
    temporary_stem,
)

__all__ = ["TMP_MARK", "CheckpointWriter", "ShardStream", "check_output_path"]


class CheckpointWriter:
    """Writes one output (a file, or a directory of files) atomically. Use as a context manager."""

    def __init__(
        self,
        out: Path,
        *,
        is_dir: bool,
        inputs: Sequence[Path],
        force: bool = False,
        scratch: str | None = None,
        resume: bool = False,
    ) -> None:
        """`scratch` names a folder inside a directory OUT's temporary that is never published: a failed run
        keeps the temporary while it holds anything, and a later run with `resume` takes that temporary over
        (see `take_over_scratch`) instead of removing it as stale."""
        self.out = Path(out).absolute()
        self.is_dir = is_dir
        self.force = force
        self.scratch = scratch if is_dir else None
        self.resume = resume
        self.resumed_from: Path | None = None
        self.removed_stale: list[Path] = []
        self.restored = restore_interrupted_swap(self.out)
        check_output_path(self.out, inputs, force)
        self.tmp = self.out.parent / f"{temporary_stem(self.out)}{TMP_MARK}{os.getpid()}"
        self.bytes_written = 0
        self.needed = 0

    def __enter__(self) -> CheckpointWriter:
        if self.scratch is not None and self.resume:
            self.resumed_from = take_over_scratch(self.out, self.tmp, self.scratch)
        self.removed_stale = remove_stale_temporaries(self.out, keep=self.tmp if self.resumed_from else None)
        try:
            if self.is_dir:
                self.tmp.mkdir(exist_ok=self.resumed_from is not None)
            if self.scratch is not None:
                (self.tmp / self.scratch).mkdir(exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.out}: cannot create the output: {e.strerror or e}") from None
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self._publish()
        elif not (self.scratch is not None and holds_anything(self.tmp / self.scratch)):
            with interrupts.held():  # a second Ctrl-C must not leave half a temporary behind
                remove(self.tmp)

    def path(self, relname: str) -> Path:
        """Where a file named `relname` inside OUT is being built."""
        return self.tmp / relname if self.is_dir else self.tmp

    def reserve(self, nbytes: int) -> None:
        """Fail before writing anything when the file system cannot hold `nbytes` more."""
        self.needed = nbytes
        free = shutil.disk_usage(self.out.parent).free
        if nbytes > free:
            raise OutputError(f"{self.out}: needs {_size(nbytes)} but only {_size(free)} is free on its file system")

    @contextlib.contextmanager
    def shard(
        self, relname: str, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
    ) -> Iterator[ShardStream]:
        """Open one safetensors file, write its header, and yield a stream that takes the tensors in order."""
        target = self.path(relname)
        try:
            header = build_header(entries, metadata)
        except ValueError as e:  # what no safetensors reader could read back
            raise OutputError(f"{self.out}: cannot write {relname}: {e}") from None
        expected = [nbytes_of(dtype, shape) for _, dtype, shape in entries]
        # Unbuffered: tensor bytes go straight to the descriptor, and in-kernel copies append at its offset.
        with self._guard(relname, len(header) + sum(expected)), open(target, "wb", buffering=0) as f:
            stream = ShardStream(f, [name for name, _, _ in entries], expected, start=len(header))
            write_all(f, memoryview(header))
            try:
                yield stream
                stream.finish()
            finally:
                stream.close()
            f.flush()
            os.fsync(f.fileno())
        self.bytes_written += len(header) + sum(expected)

    def write_json(self, relname: str, doc: Any) -> None:
        target = self.path(relname)
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        with self._guard(relname, len(data)), open(target, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())

    def copy_file(self, source: Path, relname: str) -> None:
        """Copy the regular file `source` (never a pipe or a device: see input_file) to `relname` in OUT;
        folders of any depth are made as needed."""
        target = self.path(relname)
        with (
            os.fdopen(open_input(source), "rb", buffering=0) as src,
            self._guard(relname, os.fstat(src.fileno()).st_size),
        ):
            make_folders(target.parent, self.tmp)
            with open(target, "wb", buffering=0) as f:
                shutil.copyfileobj(src, f, COPY_CHUNK)
                os.fsync(f.fileno())  # published only once every byte is on disk, like the shards

    @contextlib.contextmanager
    def _guard(self, relname: str, nbytes: int) -> Iterator[None]:
        """Turn the OS's refusals (no space, no permission, read-only) into one clear error naming OUT and the
        file in it (never the temporary)."""
        name = relname if self.is_dir else self.out.name
        try:
            yield
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                free = shutil.disk_usage(self.out.parent).free
                limit = "over the file size limit" if e.errno == errno.EFBIG else "out of space"
                raise OutputError(
                    f"{self.out}: {limit} writing {name} (the output needs {_size(max(self.needed, nbytes))}, "
                    f"{_size(free)} is free); nothing was written"
                ) from None
            raise OutputError(f"{self.out}: cannot write {name}: {e.strerror or e}") from None

    def _publish(self) -> None:
        """Rename the finished temporary onto OUT. A file replaces the old OUT in one atomic rename; a
        directory cannot, so the old one is moved aside first and moved back if the second rename fails
        (or, after a kill between the two, by the next run: see `restore_interrupted_swap`)."""
        old = self.out.parent / f"{self.tmp.name}{OLD_SUFFIX}"
        # Held back: a Ctrl-C between the two renames would leave OUT moved aside, and one just after them the
        # old copy behind; it takes effect once OUT is whole and the old one gone.
        with interrupts.held():
            self._swap(old)
            remove(old)

    def _swap(self, old: Path) -> None:
        swapped = False
        if self.scratch is not None:
            remove(self.tmp / self.scratch)
        try:
            _fsync_dir(self.tmp if self.is_dir else self.tmp.parent)
            if self.is_dir and (self.out.exists() or self.out.is_symlink()):
                os.replace(self.out, old)
                swapped = True
            os.replace(self.tmp, self.out)
            _fsync_dir(self.out.parent)
        except OSError as e:
            if swapped:
                os.replace(old, self.out)
            remove(self.tmp)
            raise OutputError(f"{self.out}: cannot publish the output: {e.strerror or e}") from None
        interrupts.committed.append(self.out)


def check_output_path(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an OUT that is, contains or lies inside an input, and an existing OUT (a dangling link
    included) without --force."""
    resolved = Path(os.path.realpath(out))  # realpath, not resolve(): a link loop is just a name here
    for source in inputs:
        src = Path(os.path.realpath(source))
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise OutputError(f"{out}: the output may not be an input or lie inside one ({source})")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"{out}: already exists; pass ", Option("force", flag=True), " to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: output directory does not exist")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(nbytes: int) -> str:
    if nbytes < 1e6:
        return f"{nbytes / 1e3:.1f} kB"
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
