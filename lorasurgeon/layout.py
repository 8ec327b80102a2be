"""Where a checkpoint's files are, and which of its names and symbolic links may be followed.

Names found inside a checkpoint (an index's shard names, a directory's entries) must stay inside it:
- a shard name is a normalised relative path (no `..`, `.`, empty part or trailing slash; not absolute);
- a symbolic link is followed only to a file inside the checkpoint directory, or, in a Hugging Face Hub
  cache, from `<cache>/models--org--name/snapshots/<revision>/` to the same repository's `blobs/` folder,
  where huggingface_hub keeps every file's bytes (each snapshot file is a link `../../blobs/<hash>`);
- only regular files are read: a pipe, a device, a socket or a link to a directory is refused by name.
Paths the user names (the checkpoint directory itself, a file given on the command line) are followed
wherever they point.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from lorasurgeon.errors import InputError
from lorasurgeon.input_file import describe, kind

# A repository's folder in the Hub cache: huggingface_hub's repo_folder_name ("models--org--name").
HUB_REPO_FOLDER = re.compile(r"(models|datasets|spaces)--.+")


@dataclass(frozen=True)
class Confinement:
    """The places a checkpoint directory's names may lead to: its own real directory, and the blobs folder of
    the Hub cache repository it lies in (None outside a Hub cache)."""

    root: Path
    real_root: Path
    blobs: Path | None

    @classmethod
    def of(cls, root: Path) -> Confinement:
        real_root = Path(os.path.realpath(root))
        return cls(root=root, real_root=real_root, blobs=hub_blobs(real_root))

    def allows(self, real: Path) -> bool:
        """Whether a resolved path lies where this checkpoint's links may point."""
        return real.is_relative_to(self.real_root) or (self.blobs is not None and real.is_relative_to(self.blobs))

    def describe(self) -> str:
        inside = f"the checkpoint directory {self.root}"
        return f"{inside} or its Hub cache blobs {self.blobs}" if self.blobs else inside


def hub_blobs(real_root: Path) -> Path | None:
    """The `blobs/` folder of the Hub cache repository whose snapshot holds `real_root`, if any."""
    parts = real_root.parts
    for i in range(len(parts) - 2, 0, -1):  # `snapshots` must have a revision folder below it
        if parts[i] == "snapshots" and HUB_REPO_FOLDER.fullmatch(parts[i - 1]):
            blobs = Path(*parts[:i], "blobs")
            return Path(os.path.realpath(blobs)) if blobs.is_dir() else None
    return None


def check_name(name: str, where: Path) -> None:
    """Refuse a shard name that is no normalised relative path inside the checkpoint (InputError naming it)."""
    if name.isascii() and name.isprintable() and "/" not in name and name not in ("", ".", ".."):
        return  # a plain file name: the common case, checked in one pass
    if not name or "\x00" in name or not _is_text(name):
        raise InputError(f"{where}: shard name {name!r} is not a file name")
    normal = posixpath.normpath(name)
    if name.startswith("/") or normal == ".." or normal.startswith("../"):
        raise InputError(f"{where}: shard name {name!r} points outside the checkpoint directory")
    if normal != name or name.endswith("/"):
        raise InputError(f"{where}: shard name {name!r} is not a normalised relative path (e.g. {normal!r})")


def shard_path(box: Confinement, name: str, where: Path) -> Path:
    """The path of the shard `name` of the checkpoint in `box.root`, refusing names and links that lead
    outside it (see module docstring), and anything but a regular file."""
    check_name(name, where)
    candidate = box.root / name
    try:
        mode = os.lstat(candidate).st_mode
    except OSError as e:
        raise InputError(f"{candidate}: shard listed in {where.name} is missing ({describe(e)})") from None
    if "/" in name or stat.S_ISLNK(mode):  # a plain name that is no link cannot leave the directory
        follow(box, candidate, f"shard name {name!r} in {where}")
    elif not stat.S_ISREG(mode):
        raise InputError(f"{candidate}: is {kind(mode)}, not a regular file")
    return candidate


def follow(box: Confinement, path: Path, what: str) -> Path:
    """The real path of `path` inside the checkpoint (a link followed), which must be a regular file."""
    real = Path(os.path.realpath(path))
    if not box.allows(real):
        raise InputError(f"{what} points outside {box.describe()} (to {real})")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise InputError(f"{path}: cannot read: {describe(e)}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: is {kind(mode)}, not a regular file")
    return real


@dataclass(frozen=True)
class Companion:
    """A non-weight file of a checkpoint directory: `name` relative to it, `source` the regular file whose
    bytes OUT gets (a link's real target)."""

    name: str
    source: Path


def companion_files(root: Path) -> tuple[Companion, ...]:
    """Every file under the checkpoint directory `root` but hidden ones (a part starting with "."), in name
    order, walked without recursion (a tree may be thousands of folders deep). Links are followed by the rule
    of the module docstring; InputError names a link that leads outside, dangles or loops, a link to a
    directory, and anything that is not a regular file (a pipe, a device, a socket)."""
    box = Confinement.of(root)
    found: list[Companion] = []
    pending = [""]
    while pending:
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(root / folder), key=lambda entry: entry.name)
        except OSError as e:
            raise InputError(f"{root / folder}: cannot read: {describe(e)}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{folder}/{entry.name}" if folder else entry.name
            found.extend(_companion(box, name, entry, pending))
    return tuple(sorted(found, key=lambda c: c.name))


def _companion(box: Confinement, name: str, entry: os.DirEntry[str], pending: list[str]) -> list[Companion]:
    path = box.root / name
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError as e:
        raise InputError(f"{path}: cannot read: {describe(e)}") from None
    if stat.S_ISDIR(mode):
        pending.append(name)
        return []
    if stat.S_ISREG(mode):
        return [Companion(name, path)]
    if not stat.S_ISLNK(mode):
        raise InputError(f"{path}: is {kind(mode)}, not a regular file; lorasurgeon copies only files")
    try:
        target = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: is a dangling symbolic link (to {os.readlink(path)})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {describe(e)}") from None
    if stat.S_ISDIR(target):
        raise InputError(f"{path}: is a symbolic link to a directory, which lorasurgeon does not follow")
    return [Companion(name, follow(box, path, f"{path}: the symbolic link"))]


def _is_text(name: str) -> bool:
    """Whether `name` is Unicode text (no lone surrogate), as a name written into an index must be."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
