"""CheckpointWriter: build OUT in a temporary sibling, stream shards into it, publish it with a rename.

Each shard's header is written first (every tensor's name, dtype and shape is known from the plan), then
tensor bytes are appended in header order, so no shard is ever buffered. Nothing appears at OUT until
every byte is written and fsync'd; an existing OUT (with --force) stays intact until the new one is
complete. Temporaries are named `.<OUT name>.lorasurgeon-tmp-<pid>` so a later run can recognise and remove
those left by a killed run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch

from lorasurgeon.checkpoint import Checkpoint, write_all
from lorasurgeon.errors import OutputError
from lorasurgeon.header import TensorInfo, build_header, nbytes_of

TMP_MARK = ".lorasurgeon-tmp-"
OLD_SUFFIX = "-old"  # the previous OUT directory, moved aside for the instant of the swap


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
        self.tmp = self.out.parent / f".{self.out.name}{TMP_MARK}{os.getpid()}"
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
            raise OutputError(f"{self.tmp.parent}: cannot create the output: {e.strerror or e}") from None
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self._publish()
        elif not (self.scratch is not None and _holds_anything(self.tmp / self.scratch)):
            _remove(self.tmp)

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
        header = build_header(entries, metadata)
        expected = [nbytes_of(dtype, shape) for _, dtype, shape in entries]
        # Unbuffered: tensor bytes go straight to the descriptor, and in-kernel copies append at its offset.
        with self._guard(target, len(header) + sum(expected)), open(target, "wb", buffering=0) as f:
            stream = ShardStream(f, [name for name, _, _ in entries], expected)
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
        with self._guard(target, len(data)), open(target, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())

    def copy_file(self, source: Path, relname: str) -> None:
        target = self.path(relname)
        with self._guard(target, source.stat().st_size):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            with open(target, "rb") as f:  # published only once every byte is on disk, like the shards
                os.fsync(f.fileno())

    @contextlib.contextmanager
    def _guard(self, target: Path, nbytes: int) -> Iterator[None]:
        """Turn the OS's refusals (no space, no permission, read-only) into one clear error."""
        try:
            yield
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                free = shutil.disk_usage(self.out.parent).free
                limit = "over the file size limit" if e.errno == errno.EFBIG else "out of space"
                raise OutputError(
                    f"{self.out}: {limit} writing {target.name} (the output needs {_size(max(self.needed, nbytes))}, "
                    f"{_size(free)} is free); nothing was written"
                ) from None
            raise OutputError(f"{self.out}: cannot write {target.name}: {e.strerror or e}") from None

    def _publish(self) -> None:
        """Rename the finished temporary onto OUT. A file replaces the old OUT in one atomic rename; a
        directory cannot, so the old one is moved aside first and moved back if the second rename fails
        (or, after a kill between the two, by the next run: see `restore_interrupted_swap`)."""
        old = self.out.parent / f".{self.out.name}{TMP_MARK}{os.getpid()}{OLD_SUFFIX}"
        swapped = False
        if self.scratch is not None:
            _remove(self.tmp / self.scratch)
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
            _remove(self.tmp)
            raise OutputError(f"{self.out}: cannot publish the output: {e.strerror or e}") from None
        _remove(old)


class ShardStream:
    """Takes a shard's tensors in header order, checks each one's size against the header, and writes it
    behind the caller: tensor i is written on a worker thread while the caller computes tensor i + 1 (file
    writes and torch ops both release the GIL). At most one write is pending, so at most one finished tensor
    waits in memory."""

    def __init__(self, f: BinaryIO, names: list[str], sizes: list[int]) -> None:
        self.file = f
        self._names = names
        self._sizes = sizes
        self._next = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasurgeon-writer")
        self._pending: Future[None] | None = None

    def write(self, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._expect(len(data))
        self._submit(write_all, self.file, data.data)

    def copy_from(self, source: Checkpoint, info: TensorInfo) -> None:
        """Append a tensor's bytes unchanged, straight from its source file."""
        self._expect(info.nbytes)
        self._submit(source.copy_to, info, self.file)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._wait()
        self._pending = self._worker.submit(self._then_flush, fn, *args)

    def _then_flush(self, fn: Callable[..., None], *args: Any) -> None:
        start = self.file.tell()
        fn(*args)
        # On Linux, DONTNEED starts writing the range's dirty pages back now (without waiting), so the fsync at
        # the end of the shard has little left to do, and the written data does not crowd the page cache.
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.file.fileno(), start, self.file.tell() - start, os.POSIX_FADV_DONTNEED)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the worker's OSError here, inside the writer's guard

    def _expect(self, nbytes: int) -> None:
        if self._next >= len(self._names) or nbytes != self._sizes[self._next]:
            raise RuntimeError(f"writer: tensor #{self._next} does not match the shard header")
        self._next += 1

    def finish(self) -> None:
        self._wait()
        if self._next != len(self._names):
            raise RuntimeError(f"writer: {len(self._names) - self._next} tensors were never written")

    def close(self) -> None:
        """Stop the worker after its current write (on success finish() has already waited for it)."""
        self._worker.shutdown(wait=True, cancel_futures=True)


def check_output_path(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an OUT that is, contains or lies inside an input, and an existing OUT without --force."""
    resolved = out.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise OutputError(f"{out}: the output may not be an input or lie inside one ({source})")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: output directory does not exist")


def restore_interrupted_swap(out: Path) -> Path | None:
    """Put back an old OUT directory that a run killed mid-swap left moved aside; returns where it was."""
    if out.exists() or out.is_symlink():
        return None
    for old in _temporaries(out):
        if not old.name.endswith(OLD_SUFFIX):
            continue
        pid_text = old.name.rsplit(TMP_MARK, 1)[1].removesuffix(OLD_SUFFIX)
        if not (pid_text.isdigit() and _alive(int(pid_text))):
            os.replace(old, out)
            return old
    return None


def remove_stale_temporaries(out: Path, keep: Path | None = None) -> list[Path]:
    """Remove temporaries of OUT left by runs that no longer exist (but `keep`); refuse if one is still running."""
    removed = []
    for tmp in _temporaries(out):
        if tmp == keep:
            continue
        pid_text = tmp.name.rsplit(TMP_MARK, 1)[1].removesuffix(OLD_SUFFIX)
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _alive(int(pid_text)):
            raise OutputError(f"{out}: another lorasurgeon run (pid {pid_text}) is writing it right now")
        _remove(tmp)
        removed.append(tmp)
    return removed


def take_over_scratch(out: Path, tmp: Path, scratch: str) -> Path | None:
    """Rename the newest temporary of OUT whose run is over (dead, or this process's) and whose `scratch`
    folder holds anything onto `tmp` (this run's name), emptied of all but that folder; returns where it
    was. A kill at any point leaves the folder in a dead run's temporary, where the next run finds it again."""
    found = []
    for old in _temporaries(out):
        pid_text = old.name.rsplit(TMP_MARK, 1)[1]
        dead = pid_text.isdigit() and (int(pid_text) == os.getpid() or not _alive(int(pid_text)))
        if dead and old.is_dir() and _holds_anything(old / scratch):
            found.append((os.stat(old / scratch).st_mtime_ns, old))
    if not found:
        return None
    old = max(found)[1]
    os.replace(old, tmp)
    for leftover in tmp.iterdir():
        if leftover.name != scratch:
            _remove(leftover)
    return old


def _holds_anything(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _temporaries(out: Path) -> list[Path]:
    """Siblings named as temporaries of `out` (listed, not globbed: OUT's name may hold glob characters)."""
    prefix = f".{out.name}{TMP_MARK}"
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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
