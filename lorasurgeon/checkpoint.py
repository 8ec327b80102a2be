"""Checkpoint: a lazy, read-only view of safetensors weights in any of the three layouts.

Layouts: one `.safetensors` file; a `*.safetensors.index.json` with its shards; a Hugging Face directory
holding either (a Hub cache snapshot included). Only headers are read when opening; tensor data is read on
demand with positioned reads into private buffers (never a whole-shard mmap, whose touched pages would all
count as resident memory). Which names and links inside a checkpoint are followed is `layout`'s rule.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from lorasurgeon import hub, strict_json
from lorasurgeon.errors import InputError, UnsupportedError
from lorasurgeon.header import Header, TensorInfo, pickle_refusal, read_header, read_into, torch_dtype
from lorasurgeon.input_file import describe, open_input, read_input
from lorasurgeon.layout import Confinement, shard_path

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


@dataclass(frozen=True, eq=False)  # eq=False: an open checkpoint is equal only to itself, and hashable
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
        """Open `path` in whichever layout it is; raise InputError for anything unreadable or unsafe. A `path`
        that names nothing on disk may be a Hub repo id (`org/name[@revision]`, see `hub.resolve`)."""
        path = hub.resolve(path, download=False)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise InputError(f"{path}: no such file or directory") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read: {describe(e)}") from None
        if stat.S_ISDIR(mode):
            return _open_dir(path)
        refuse_pickle(path)
        if path.name.endswith(".index.json"):
            return _open_index(path, layout="index")
        # A file the user names is read wherever a link to it points (only names found inside are confined).
        shard = Shard(path.name, read_header(path))
        return _checkpoint(path, "file", path.parent, (shard,), config=None)

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
            if max(info.shape, default=0) >= 2**63:  # valid in safetensors (u64), not in torch (i64)
                raise UnsupportedError(f"{info.path}: tensor {info.name!r} has a dimension torch cannot hold")
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
            self._files[path] = os.fdopen(open_input(path), "rb", buffering=0)  # closed by close()
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
    if os.path.lexists(root / "adapter_config.json"):
        raise InputError(f"{root}: is a PEFT adapter directory, not a checkpoint")
    for stem in WEIGHT_STEMS:
        # lexists, not is_file: a pipe or a loop under the name is refused by name, not passed over
        if os.path.lexists(root / f"{stem}.safetensors.index.json"):
            return _open_index(root / f"{stem}.safetensors.index.json", layout="dir")
        if os.path.lexists(root / f"{stem}.safetensors"):
            return _open_files(root, f"{stem}.safetensors")
    indexes = sorted(root.glob("*.safetensors.index.json"))
    files = sorted(root.glob("*.safetensors"))
    if len(indexes) == 1:
        return _open_index(indexes[0], layout="dir")
    if not indexes and len(files) == 1:
        return _open_files(root, files[0].name)
    if indexes or files:
        names = ", ".join(p.name for p in indexes or files)
        raise InputError(f"{root}: holds several checkpoints ({names}); name the file to use")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(root / pickles[0])
    raise InputError(f"{root}: holds no .safetensors checkpoint")


def _open_files(root: Path, name: str) -> Checkpoint:
    """A directory whose weights are the one file `name` (in the directory, or a link the rule allows)."""
    shard = Shard(name, read_header(shard_path(Confinement.of(root), name, root)))
    return _checkpoint(root, "dir", root, (shard,), _config(root))


def _open_index(index_path: Path, layout: str) -> Checkpoint:
    root = index_path.parent  # the folder it lies in, not a Hub blob's: shard names are relative to it
    doc = read_json(index_path)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index_path}: field 'weight_map' must map tensor names to shard file names")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InputError(f"{index_path}: field 'metadata' must be an object")
    box = Confinement.of(root)
    names = list(dict.fromkeys(weight_map.values()))
    shards = tuple(Shard(name, read_header(shard_path(box, name, index_path))) for name in names)
    path = index_path if layout == "index" else root
    ckpt = _checkpoint(path, layout, root, shards, _config(root), index_path.name, metadata)
    stored_in = {info.name: shard.name for shard in ckpt.shards for info in shard.header.tensors}
    for tensor, shard_name in weight_map.items():
        if stored_in.get(tensor) != shard_name:
            raise InputError(f"{index_path}: weight_map puts {tensor!r} in {shard_name}, whose header lacks it")
    return ckpt


def _checkpoint(
    path: Path,
    layout: str,
    root: Path,
    shards: tuple[Shard, ...],
    config: dict[str, Any] | None,
    index_name: str | None = None,
    index_metadata: dict[str, Any] | None = None,
) -> Checkpoint:
    """The Checkpoint of these shards, refusing a tensor stored in two of them."""
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for info in shard.header.tensors:
            if info.name in tensors:
                raise InputError(
                    f"{path}: tensor {info.name!r} is stored twice ({tensors[info.name].path.name}, {shard.name})"
                )
            tensors[info.name] = info
    return Checkpoint(
        path=path,
        layout=layout,
        root=root,
        shards=shards,
        index_name=index_name,
        index_metadata=index_metadata or {},
        config=config,
        tensors=tensors,
    )


def _config(root: Path) -> dict[str, Any] | None:
    config_path = root / MODEL_CONFIG
    return read_config(config_path) if os.path.lexists(config_path) else None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or InputError naming the file. Python's JSON grammar (these files are written
    and read by Python tools), but a key named twice in one object, or a lone surrogate, is refused."""
    raw = read_input(path)  # only a regular file: a pipe of this name would block a plain read forever
    try:
        doc = strict_json.loads(raw.decode("utf-8"), serde=False)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: is not valid JSON ({e})") from None
    except strict_json.JsonRefusal as e:
        raise InputError(f"{path}: {_json_problem(e)}") from None
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


def _json_problem(e: strict_json.JsonRefusal) -> str:
    at = "".join(f"[{k!r}]" for k in e.keys)
    if e.reason == "duplicate key":
        return f"names the key {e.key!r} twice{' in ' + at if at else ''}"
    if e.reason == "lone UTF-16 surrogate":
        return f"{at or 'a key'}: {e.key!r} holds a lone UTF-16 surrogate, which is not Unicode text"
    return f"is not valid JSON ({e.reason})"
