"""Checkpoint: a lazy, read-only view of safetensors weights in any of the three layouts.

Layouts: one `.safetensors` file; a `*.safetensors.index.json` with its shards; a Hugging Face directory
holding either. Only headers are read when opening; tensor data is read on demand with positioned reads
into private buffers (never a whole-shard mmap, whose touched pages would all count as resident memory).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from lorasurgeon.errors import InputError
from lorasurgeon.header import Header, TensorInfo, pickle_refusal, read_header, read_into, torch_dtype

if TYPE_CHECKING:
    import torch

# Files holding Python pickles: never opened, whatever their extension claims.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")
MODEL_CONFIG = "config.json"
COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a checkpoint; `name` is its path relative to the checkpoint root."""

    name: str
    header: Header


@dataclass
class Checkpoint:
    """Tensor names, shapes and dtypes from headers; data on demand. Use as a context manager."""

    path: Path
    layout: str  # "file" | "index" | "dir"
    root: Path
    shards: tuple[Shard, ...]
    index_name: str | None = None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    _files: dict[Path, BinaryIO] = field(default_factory=dict, repr=False)
    _opening: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the writer's thread reads too

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        """Open `path` in whichever layout it is; raise InputError for anything unreadable or unsafe."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        if path.is_dir():
            return _open_dir(path)
        refuse_pickle(path)
        if not path.is_file():
            raise InputError(f"{path}: is not a regular file")
        if path.name.endswith(".index.json"):
            return _open_index(path, layout="index")
        return _from_shards(path, "file", path.parent, [path.name])

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __iter__(self) -> Iterator[TensorInfo]:
        for shard in self.shards:
            yield from shard.header.tensors

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, info: TensorInfo, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's data in a fresh CPU buffer (only this tensor is resident), or in the first bytes of
        `into` (a uint8 CPU tensor of at least info.nbytes, which a caller reuses)."""
        import torch  # here, not at the top: reading headers (report) needs no torch, whose import takes seconds

        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        # uninitialised: the read fills every byte
        buffer = torch.empty(info.nbytes, dtype=torch.uint8) if into is None else into[: info.nbytes]
        read_into(info.path, self._file(info.path).fileno(), buffer.numpy().data, info.start)
        return buffer.view(dtype).reshape(info.shape)

    def read_bytes(self, info: TensorInfo) -> bytes:
        """The tensor's raw bytes, without torch: for the few scalars a format stores as tensors (kohya `.alpha`)."""
        raw = bytearray(info.nbytes)
        read_into(info.path, self._file(info.path).fileno(), memoryview(raw), info.start)
        return bytes(raw)

    def copy_to(self, info: TensorInfo, out: BinaryIO) -> None:
        """Append the tensor's raw bytes to `out` without decoding them (in-kernel copy where possible)."""
        src = self._file(info.path)
        position, remaining = info.start, info.nbytes
        while remaining:
            try:
                sent = os.copy_file_range(src.fileno(), out.fileno(), remaining, position)
            except OSError:  # cross-device or unsupported file system: copy through user space
                sent = 0
            if sent == 0:
                chunk = os.pread(src.fileno(), min(remaining, COPY_CHUNK), position)
                if not chunk:
                    raise InputError(f"{info.path}: file ended inside tensor {info.name!r} (truncated?)")
                write_all(out, memoryview(chunk))
                sent = len(chunk)
            position += sent
            remaining -= sent

    def _file(self, path: Path) -> BinaryIO:
        with self._opening:
            return self._open_once(path)

    def _open_once(self, path: Path) -> BinaryIO:
        if path not in self._files:
            try:
                self._files[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
            except OSError as e:
                raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
        return self._files[path]


def write_all(f: BinaryIO, data: memoryview) -> None:
    """Write every byte to an unbuffered file: one raw write may be short (Linux caps it near 2 GB)."""
    data = data.cast("B")
    while data:
        data = data[f.write(data) or 0 :]


def refuse_pickle(path: Path) -> None:
    """Pickle files can run arbitrary code when loaded; we never open them."""
    if path.suffix in PICKLE_SUFFIXES or path.name.endswith(".bin.index.json"):
        raise pickle_refusal(path)


def _open_dir(root: Path) -> Checkpoint:
    if (root / "adapter_config.json").exists():
        raise InputError(f"{root}: is a PEFT adapter directory, not a checkpoint")
    for stem in WEIGHT_STEMS:
        if (root / f"{stem}.safetensors.index.json").is_file():
            return _open_index(root / f"{stem}.safetensors.index.json", layout="dir")
        if (root / f"{stem}.safetensors").is_file():
            return _from_shards(root, "dir", root, [f"{stem}.safetensors"])
    indexes = sorted(root.glob("*.safetensors.index.json"))
    files = sorted(root.glob("*.safetensors"))
    if len(indexes) == 1:
        return _open_index(indexes[0], layout="dir")
    if not indexes and len(files) == 1:
        return _from_shards(root, "dir", root, [files[0].name])
    if indexes or files:
        names = ", ".join(p.name for p in indexes or files)
        raise InputError(f"{root}: holds several checkpoints ({names}); name the file to use")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(root / pickles[0])
    raise InputError(f"{root}: holds no .safetensors checkpoint")


def _open_index(index_path: Path, layout: str) -> Checkpoint:
    root = index_path.parent
    doc = read_json(index_path)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index_path}: field 'weight_map' must map tensor names to shard file names")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InputError(f"{index_path}: field 'metadata' must be an object")
    names = list(dict.fromkeys(weight_map.values()))
    ckpt = _from_shards(index_path if layout == "index" else root, layout, root, names, index_path)
    ckpt.index_name = index_path.name
    ckpt.index_metadata = metadata
    stored_in = {info.name: shard.name for shard in ckpt.shards for info in shard.header.tensors}
    for tensor, shard_name in weight_map.items():
        if stored_in.get(tensor) != shard_name:
            raise InputError(f"{index_path}: weight_map puts {tensor!r} in {shard_name}, whose header lacks it")
    return ckpt


def _from_shards(path: Path, layout: str, root: Path, names: list[str], index: Path | None = None) -> Checkpoint:
    shards = tuple(Shard(name, read_header(_shard_path(root, name, index))) for name in names)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for info in shard.header.tensors:
            if info.name in tensors:
                raise InputError(
                    f"{path}: tensor {info.name!r} is stored twice ({tensors[info.name].path.name}, {shard.name})"
                )
            tensors[info.name] = info
    config_path = root / MODEL_CONFIG
    config = read_config(config_path) if layout != "file" and config_path.is_file() else None
    return Checkpoint(path=path, layout=layout, root=root, shards=shards, config=config, tensors=tensors)


def _shard_path(root: Path, name: str, index: Path | None) -> Path:
    """The shard's path, refusing names that escape the checkpoint directory (../, absolute, symlinks)."""
    where = index or root
    if not name or "\x00" in name:
        raise InputError(f"{where}: shard name {name!r} is not a file name")
    candidate = root / name
    try:
        mode = os.lstat(candidate).st_mode  # one call answers "symlink?" and "regular file?" (the common case)
    except OSError:
        mode = 0
    # A plain file name that is no symlink cannot leave the directory; anything else is resolved and checked.
    plain = "/" not in name and name not in (".", "..") and not stat.S_ISLNK(mode)
    if not plain and (Path(name).is_absolute() or not candidate.resolve().is_relative_to(root.resolve())):
        raise InputError(f"{where}: shard name {name!r} points outside the checkpoint directory {root}")
    refuse_pickle(candidate)
    if not (stat.S_ISREG(mode) or candidate.is_file()):  # is_file follows a symlink that stays inside
        raise InputError(f"{candidate}: shard listed in {where.name} is missing")
    return candidate


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or InputError naming the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: is not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: is not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: must hold a JSON object")
    return doc


# config.json fields lorasurgeon reads, and the JSON type each must have.
CONFIG_FIELDS: dict[str, tuple[type, str]] = {"model_type": (str, "a string")}


def read_config(path: Path) -> dict[str, Any]:
    """A model's config.json; InputError naming the field when one we read has the wrong type."""
    config = read_json(path)
    for name, (kind, expected) in CONFIG_FIELDS.items():
        if name in config and not isinstance(config[name], kind):
            raise InputError(f"{path}: field {name!r} must be {expected}, not {config[name]!r}")
    return config
