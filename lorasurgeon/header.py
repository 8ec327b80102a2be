"""The safetensors header: parse and validate it, and write one.

Format: 8 bytes little-endian header length N, N bytes of JSON, then the tensor data. Every entry names a
dtype, a shape and [begin, end) offsets relative to the end of the header; the offsets of all entries
must tile the data region exactly (no gaps, no overlap), as the safetensors reference loader demands.
"""

from __future__ import annotations

import json
import math
import operator
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from lorasurgeon.errors import InputError

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> (the torch dtype's name, bytes per element). Names, not torch objects: commands
# that read only headers (report) never import torch, whose import takes seconds.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# Real headers are a few MB even for 100k-tensor checkpoints; a larger one is hostile or broken.
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"
# No real dimension comes near this; larger ones (possible with zero-size tensors) overflow torch.
MAX_DIM = 2**53
BY_OFFSETS = operator.attrgetter("start", "end")
# First bytes of PyTorch's formats: a zip archive (torch.save since 1.6) or a bare pickle (protocol 2-5).
PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class TensorInfo(NamedTuple):
    """Where one tensor lives: file, absolute byte range [start, end), dtype name and shape.

    A NamedTuple, not a dataclass: opening a 70B checkpoint builds ~20,000 of these, and a tuple is built
    in a third of the time of a frozen dataclass.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int
    numel: int  # math.prod(shape), kept because reports sum it over every tensor several times

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header: tensors in file order and the string metadata."""

    path: Path
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("BF16" -> torch.bfloat16)."""
    import torch  # here, not at the top: see DTYPES

    return getattr(torch, DTYPES[name][0])  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (torch.bfloat16 -> "BF16")."""
    return next(name for name, (torch_name, _) in DTYPES.items() if str(dtype) == f"torch.{torch_name}")


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPES[dtype][1] * math.prod(shape)


def pickle_refusal(path: Path) -> InputError:
    """The error for a PyTorch pickle, whatever its name: loading one can run arbitrary code."""
    return InputError(
        f"{path}: is a PyTorch pickle file, which lorasurgeon never loads because unpickling can run "
        "arbitrary code; convert it to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
    )


def read_header(path: Path) -> Header:
    """Read and validate the header of `path`; raise InputError naming the file and the tensor at fault."""
    try:
        # Plain descriptor calls, not a Python file object: a 100-shard checkpoint opens 100 of these.
        fd = os.open(path, os.O_RDONLY)
        try:
            file_size = os.fstat(fd).st_size
            prefix = os.pread(fd, 9, 0)
            if prefix.startswith(PICKLE_MAGICS) and prefix[8:9] != b"{":  # safetensors JSON opens with "{"
                raise pickle_refusal(path)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a safetensors file (only {len(prefix)} bytes long)")
            (length,) = struct.unpack("<Q", prefix[:8])
            if length > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path}: not a safetensors file (header length {length} is past the {MAX_HEADER_BYTES} "
                    "bytes any real checkpoint needs)"
                )
            if length + 8 > file_size:
                raise InputError(
                    f"{path}: not a safetensors file or truncated (header length {length} "
                    f"does not fit a file of {file_size} bytes)"
                )
            raw = bytearray(length)
            read_into(path, fd, memoryview(raw), 8)
        finally:
            os.close(fd)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_header(path, raw, file_size)


def read_into(path: Path, fd: int, view: memoryview, position: int) -> None:
    """Fill `view` with the bytes of `fd` at `position`: one read may return fewer (Linux caps it near 2 GB;
    network file systems return less); InputError naming `path` when the file ends first."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], position + done)
        if n == 0:
            raise InputError(f"{path}: file ended at byte {position + done} (truncated?)")
        done += n


def parse_header(path: Path, raw: bytes | bytearray, file_size: int) -> Header:
    """Validate the JSON header `raw` of a file of `file_size` bytes (see module docstring)."""
    doc = _load_json(path, raw, object_pairs_hook=None)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = _parse_metadata(path, doc.pop(METADATA_KEY, None))
    # json.loads keeps the last of duplicate keys silently. Every entry has one "data_offsets" key, so a
    # count that disagrees with the entries (rare) sends us through the slow parse that names the duplicate.
    if raw.count(b'"data_offsets"') != len(doc):
        _load_json(path, raw, object_pairs_hook=_no_duplicates)
    data_start = 8 + len(raw)
    tensors = sorted((_parse_entry(path, name, entry, data_start) for name, entry in doc.items()), key=BY_OFFSETS)
    _check_tiling(path, tensors, data_start, file_size)
    return Header(path=path, tensors=tuple(tensors), metadata=metadata, data_start=data_start, file_size=file_size)


def _load_json(path: Path, raw: bytes | bytearray, object_pairs_hook: Any) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    except RecursionError:
        raise InputError(f"{path}: not a safetensors file (header JSON is nested too deeply)") from None
    except _DuplicateKey as e:
        raise InputError(f"{path}: header names tensor {e.args[0]!r} twice") from None


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_metadata(path: Path, meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{path}: header {METADATA_KEY} must map strings to strings")
    return dict(meta)


def _parse_entry(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    # The hot loop of opening a checkpoint: messages are built only when something is wrong.
    if not isinstance(entry, dict):
        raise InputError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InputError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not _valid_dims(shape):
        raise InputError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers below 2**53")
    if not (isinstance(offsets, list) and len(offsets) == 2 and _is_nat(offsets[0]) and _is_nat(offsets[1])):
        raise InputError(f"{path}: tensor {name!r}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    dims = tuple(shape)
    numel = math.prod(dims)
    expected = DTYPES[dtype][1] * numel
    if end - begin != expected:
        raise InputError(
            f"{path}: tensor {name!r}: {dtype}{shape} needs {expected} bytes but data_offsets [{begin}, {end}] "
            f"hold {end - begin}"
        )
    return TensorInfo(name, dtype, dims, path, data_start + begin, data_start + end, numel)


def _valid_dims(shape: list[Any]) -> bool:
    for d in shape:  # noqa: SIM110 - a plain loop is faster than all(); it runs for every tensor of every shard
        if type(d) is not int or d < 0 or d > MAX_DIM:
            return False
    return True


def _is_nat(x: Any) -> bool:
    return type(x) is int and x >= 0


def _check_tiling(path: Path, tensors: list[TensorInfo], data_start: int, file_size: int) -> None:
    position = data_start
    for t in tensors:
        if t.end > file_size:
            raise InputError(
                f"{path}: tensor {t.name!r}: data_offsets [{t.start - data_start}, {t.end - data_start}] lie past "
                f"the end of the file ({file_size - data_start} bytes of tensor data)"
            )
        if t.start != position:
            problem = "overlaps the tensor before it" if t.start < position else "leaves a gap before it"
            raise InputError(f"{path}: tensor {t.name!r} {problem} (data offset {t.start - data_start})")
        position = t.end
    if position != file_size:
        got = file_size - data_start
        raise InputError(
            f"{path}: header describes {position - data_start} bytes of tensor data but the file holds "
            f"{got} (truncated or padded file)"
        )


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """Serialise a header for tensors written back to back in the order given; returns the 8-byte length
    prefix plus the JSON, padded with spaces to a multiple of 8 like the reference writer."""
    doc: dict[str, Any] = {}
    if metadata:
        doc[METADATA_KEY] = metadata
    offset = 0
    for name, dtype, shape in entries:
        size = nbytes_of(dtype, shape)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# struct formats of the dtypes whose one-element tensors hold a config number (kohya `.alpha`); BF16 is the top
# half of an F32.
SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def scalar_value(dtype: str, raw: bytes) -> float | None:
    """The number one element of `dtype` holds (`raw` its bytes), or None for a dtype that holds no number."""
    if dtype == "BF16" and len(raw) == 2:
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    fmt = SCALAR_FORMATS.get(dtype)
    if fmt is None or struct.calcsize(fmt) != len(raw):
        return None
    return float(struct.unpack(fmt, raw)[0])
