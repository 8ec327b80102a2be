"""The safetensors header: parse and validate it, and write one.

Format: 8 bytes little-endian header length N, N bytes of JSON, then the tensor data. Every entry names a
dtype, a shape and [begin, end) offsets relative to the end of the header; the offsets of all entries
must tile the data region exactly (no gaps, no overlap), as the safetensors reference loader demands.

The reader accepts exactly the headers `safetensors.safe_open` accepts (its JSON grammar, its dtypes, its
size arithmetic in 64 bits; a test holds the two readers to each other on mutated headers), with two
refusals of its own, each by name: a key named twice in any object (the library keeps the last silently,
so a tensor named twice is a silent misread), and the sub-byte dtypes F4 and F6_*, which have no whole
byte size.
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

from lorasurgeon import header_json
from lorasurgeon.errors import InputError, LorasurgeonError, UnsupportedError
from lorasurgeon.input_file import describe, open_input

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
    # Read and copied byte for byte, never merged into (they are not in FLOAT_DTYPES).
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "C64": ("complex64", 8),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
BYTES_PER_ELEMENT = {name: size for name, (_, size) in DTYPES.items()}
# The format's dtypes that take less than a byte per element: refused by name.
SUB_BYTE_DTYPES = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
METADATA_KEY = header_json.METADATA_KEY
# Dimensions, element counts and sizes in bits are 64-bit unsigned integers in safetensors; the element
# count must fit after every factor, as the library checks it.
LIMIT = 2**64
BY_OFFSETS = operator.attrgetter("start", "end")
# First bytes of PyTorch's formats: a zip archive (torch.save since 1.6) or a bare pickle (protocol 2-5).
PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
JSON_STARTS = (b"{", b" ", b"\t", b"\n", b"\r")


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
    # Plain descriptor calls, not a Python file object: a 100-shard checkpoint opens 100 of these.
    fd = open_input(path)  # only a regular file, and never a blocking open
    try:
        file_size = os.fstat(fd).st_size
        prefix = os.pread(fd, 9, 0)
        # safetensors JSON opens with "{" (or whitespace before it); a pickle's ninth byte is neither
        if prefix.startswith(PICKLE_MAGICS) and prefix[8:9] not in JSON_STARTS:
            raise pickle_refusal(path)
        if len(prefix) < 8:
            raise InputError(f"{path}: not a safetensors file (only {len(prefix)} bytes long)")
        (length,) = struct.unpack("<Q", prefix[:8])
        if length > MAX_HEADER_BYTES:
            raise InputError(
                f"{path}: not a safetensors file (header length {length} is past the {MAX_HEADER_BYTES} "
                "bytes the safetensors format allows)"
            )
        if length + 8 > file_size:
            raise InputError(
                f"{path}: not a safetensors file or truncated (header length {length} "
                f"does not fit a file of {file_size} bytes)"
            )
        raw = bytearray(length)
        read_into(path, fd, memoryview(raw), 8)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {describe(e)}") from None
    finally:
        os.close(fd)
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
    doc = header_json.load(path, raw)
    metadata = _parse_metadata(path, doc.pop(METADATA_KEY, None))
    data_start = 8 + len(raw)
    tensors = sorted((_parse_entry(path, name, entry, data_start) for name, entry in doc.items()), key=BY_OFFSETS)
    _check_tiling(path, tensors, data_start, file_size)
    return Header(path=path, tensors=tuple(tensors), metadata=metadata, data_start=data_start, file_size=file_size)


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
    if type(dtype) is not str or (size := BYTES_PER_ELEMENT.get(dtype)) is None:
        raise _dtype_refusal(path, name, dtype)
    if not isinstance(shape, list) or not _valid_dims(shape):
        raise InputError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative 64-bit integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and _is_nat(offsets[0]) and _is_nat(offsets[1])):
        raise InputError(f"{path}: tensor {name!r}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    dims = tuple(shape)
    numel = math.prod(dims)
    expected = size * numel
    if expected * 8 >= LIMIT or (numel == 0 and not _counts_fit(dims)):
        raise InputError(f"{path}: tensor {name!r}: {dtype}{shape} is too large for a safetensors file")
    if end - begin != expected:
        raise InputError(
            f"{path}: tensor {name!r}: {dtype}{shape} needs {expected} bytes but data_offsets [{begin}, {end}] "
            f"hold {end - begin}"
        )
    return TensorInfo(name, dtype, dims, path, data_start + begin, data_start + end, numel)


def _dtype_refusal(path: Path, name: str, dtype: Any) -> LorasurgeonError:
    if isinstance(dtype, str) and dtype in SUB_BYTE_DTYPES:
        return UnsupportedError(
            f"{path}: tensor {name!r}: dtype {dtype} ({SUB_BYTE_DTYPES[dtype]} bits per element) is not supported "
            "by lorasurgeon"
        )
    return InputError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")


def _valid_dims(shape: list[Any]) -> bool:
    for d in shape:  # noqa: SIM110 - a plain loop is faster than all(); it runs for every tensor of every shard
        if type(d) is not int or d < 0 or d >= LIMIT:
            return False
    return True


def _counts_fit(dims: tuple[int, ...]) -> bool:
    """Whether every partial product of `dims` fits 64 bits: safetensors refuses [2**40, 2**40, 0]."""
    count = 1
    for d in dims:
        count *= d
        if count >= LIMIT:
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
    # Compact and unescaped, as the safetensors library writes it: the same tensors give the same bytes.
    try:
        raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end]
        raise ValueError(f"a tensor name or metadata string holds a lone UTF-16 surrogate ({bad!r})") from None
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
