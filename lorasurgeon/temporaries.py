"""OUT's temporary siblings: their names, and the removal of those a killed run left behind.

A run builds OUT in `.<OUT name>.lorasurgeon-tmp-<pid>` beside it (a directory OUT moves the old one aside
as `...-<pid>-old` for the instant of the swap). The pid tells a later run whether the writer is still alive:
a dead run's temporary is removed, a half-done swap is put back. A name too long to take the suffix within
255 bytes is shortened in the temporary only: its start and a hash of the whole name stand for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

from lorasurgeon.errors import OutputError

TMP_MARK = ".lorasurgeon-tmp-"
OLD_SUFFIX = "-old"  # the previous OUT directory, moved aside for the instant of the swap
NAME_MAX = 255  # bytes in one file name, on every file system lorasurgeon writes to
# The longest suffix a temporary's stem takes: the mark, a pid (Linux's pid_max is at most 2**22) and -old.
SUFFIX_BYTES = len(TMP_MARK) + 7 + len(OLD_SUFFIX)


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
        remove(tmp)
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
        if dead and old.is_dir() and holds_anything(old / scratch):
            found.append((os.stat(old / scratch).st_mtime_ns, old))
    if not found:
        return None
    old = max(found)[1]
    os.replace(old, tmp)
    for leftover in tmp.iterdir():
        if leftover.name != scratch:
            remove(leftover)
    return old


def holds_anything(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _temporaries(out: Path) -> list[Path]:
    """Siblings named as temporaries of `out` (listed, not globbed: OUT's name may hold glob characters)."""
    prefix = f"{temporary_stem(out)}{TMP_MARK}"
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


def temporary_stem(out: Path) -> str:
    """The start of OUT's temporaries' names: `.<name>`, or, when that and the longest suffix would pass
    NAME_MAX bytes, `.<start of name>~<hash of name>`: still recognisable, and distinct per OUT."""
    stem = f".{out.name}"
    if len(os.fsencode(stem)) + SUFFIX_BYTES <= NAME_MAX:
        return stem
    digest = "~" + hashlib.sha256(os.fsencode(out.name)).hexdigest()[:16]
    room = NAME_MAX - SUFFIX_BYTES - len(digest)
    while len(os.fsencode(stem)) > room:  # cut by characters, so no multi-byte character is split
        stem = stem[:-1]
    return stem + digest


def make_folders(folder: Path, top: Path) -> None:
    """mkdir -p of `folder` below the existing `top`, without recursion (Path.mkdir recurses once per
    missing level, and a tree thousands of folders deep exhausts the interpreter's stack)."""
    missing = []
    while folder != top and not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)


def remove(path: Path) -> None:
    """Remove a file or a whole tree, without recursion (shutil.rmtree recurses per level) and ignoring
    what is already gone."""
    try:
        top = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(top.st_mode):
        with contextlib.suppress(OSError):
            path.unlink()
        return
    folders, pending = [], [path]
    while pending:
        folder = pending.pop()
        folders.append(folder)
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()
