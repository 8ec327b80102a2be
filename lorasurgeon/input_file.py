"""Input files: opened read-only, only when they are regular files, and never in a way that can block.

A named pipe under a checkpoint's name would make a plain open() wait forever, and opening a device can have
effects of its own. Every input is stat'ed first (nothing but a regular file is opened), then opened with
O_NONBLOCK (which regular files ignore) and checked again with fstat, so a swap between the two cannot slip
a pipe in either. Symbolic links are followed here; which ones may be is decided by `layout`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from lorasurgeon.errors import InputError

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def open_input(path: Path) -> int:
    """A read-only descriptor of the regular file at `path`; InputError naming it when it is anything else
    (missing, a pipe, a device, a directory, a symbolic link loop, unreadable)."""
    require_regular(path)
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {describe(e)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{path}: is {kind(mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_input(path: Path) -> bytes:
    """Every byte of the regular file at `path` (see `open_input`)."""
    fd = open_input(path)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {describe(e)}") from None
    finally:
        os.close(fd)


def require_regular(path: Path) -> os.stat_result:
    """The stat of `path`, symbolic links followed; InputError naming it unless it is a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {describe(e)}") from None
    except (ValueError, UnicodeEncodeError):  # a NUL, or a lone surrogate no file system name can hold
        raise InputError(f"{path!r} is not a file name") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is {kind(st.st_mode)}, not a regular file")
    return st


def kind(mode: int) -> str:
    """What a file of this mode is, in words ("a named pipe")."""
    return KINDS.get(stat.S_IFMT(mode), "a special file")


def describe(error: OSError) -> str:
    """The OS's reason, with the one that needs explaining explained."""
    if error.errno == errno.ELOOP:
        return f"{error.strerror} (a symbolic link that points to itself, or a loop of them)"
    return str(error.strerror or error)
