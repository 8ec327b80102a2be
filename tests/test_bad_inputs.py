"""Every malformed input class, through every command that reads it: a clean error and nothing else.

Each case is generated here from the valid tiny Llama and its PEFT adapter (conftest), by rewriting a copy.
Every run must end with exit code 2 (exit 1 for `check` when the adapter merely does not fit: that is
its documented answer), exactly one `Error:` line that names the bad file, no traceback, nothing written
next to OUT, and every input byte unchanged. Hypothesis then mutates valid files at random: the header
and index readers may only read them correctly or raise a LorasurgeonError.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from builders import run_cli, tree_hashes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import LorasurgeonError
from lorasurgeon.header import read_header

COMMANDS = ("check", "merge", "unmerge")
WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


# --- safetensors bytes, taken apart and put back together -------------------------------------------------


def split(raw: bytes) -> tuple[dict[str, dict[str, object]], bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header: object, data: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def tensors_by_offset(header: dict[str, dict[str, object]]) -> list[str]:
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"])  # type: ignore[return-value,arg-type]


def rewrite(edit: Callable[[dict[str, dict[str, object]]], None]) -> Callable[[bytes], bytes]:
    """A file mutation that edits the header JSON (entries in file order) and keeps the data."""

    def mutate(raw: bytes) -> bytes:
        header, data = split(raw)
        edit(header)
        return join(header, data)

    return mutate


def _first(header: dict[str, dict[str, object]]) -> dict[str, object]:
    return header[tensors_by_offset(header)[0]]


def _set(key: str, value: object) -> Callable[[dict[str, dict[str, object]]], None]:
    return lambda h: _first(h).__setitem__(key, value)


def _overlap(header: dict[str, dict[str, object]]) -> None:
    second = tensors_by_offset(header)[1]
    begin, end = header[second]["data_offsets"]  # type: ignore[misc]
    header[second]["data_offsets"] = [begin - 4, end - 4]


def _gap(raw: bytes) -> bytes:
    """Four spare bytes after the first tensor, the rest moved up by four: the file size still matches the
    header, so only the gap check can find it (shifting without padding ran past the end of the file)."""
    header, data = split(raw)
    names = tensors_by_offset(header)
    first_end = header[names[0]]["data_offsets"][1]  # type: ignore[index]
    for name in names[1:]:
        begin, end = header[name]["data_offsets"]  # type: ignore[misc]
        header[name]["data_offsets"] = [begin + 4, end + 4]
    return join(header, data[:first_end] + b"\0" * 4 + data[first_end:])


def _past_end(header: dict[str, dict[str, object]]) -> None:
    last = header[tensors_by_offset(header)[-1]]
    begin, end = last["data_offsets"]  # type: ignore[misc]
    last["data_offsets"] = [begin + 1_000_000, end + 1_000_000]


def _size_mismatch(header: dict[str, dict[str, object]]) -> None:
    entry = _first(header)
    entry["shape"] = [*entry["shape"][:-1], entry["shape"][-1] + 1]  # type: ignore[index,operator]


def _duplicate(raw: bytes) -> bytes:
    header, data = split(raw)
    text = json.dumps(header)
    name = tensors_by_offset(header)[0]
    entry = json.dumps({name: header[name]})[1:-1]
    return join(text[:-1].encode() + b", " + entry.encode() + b"}", data)


def _escaped_duplicate(raw: bytes) -> bytes:
    """The first tensor named twice, the copy spelling a field with a JSON escape (json.loads keeps the last
    copy; a count of the literal field names missed it)."""
    header, data = split(raw)
    name = tensors_by_offset(header)[0]
    copy = json.dumps({name: header[name]})[1:-1].replace("data_offsets", "data\\u005foffsets")
    return join(json.dumps(header)[:-1].encode() + b", " + copy.encode() + b"}", data)


def _text_edit(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    """Replace the first `old` in the header text by `new` (the data stays)."""

    def mutate(raw: bytes) -> bytes:
        text = json.dumps(split(raw)[0]).encode()
        assert old in text, old
        return join(text.replace(old, new, 1), split(raw)[1])

    return mutate


def _first_renamed(name: str) -> Callable[[bytes], bytes]:
    def mutate(raw: bytes) -> bytes:
        header, data = split(raw)
        first = tensors_by_offset(header)[0]
        text = json.dumps({name if n == first else n: v for n, v in header.items()})  # escapes a surrogate
        return join(text.encode(), data)

    return mutate


def _sub_byte(header: dict[str, dict[str, object]]) -> None:
    """The first tensor as F4 with as many 4-bit elements as its bytes hold: valid safetensors."""
    entry = _first(header)
    begin, end = entry["data_offsets"]  # type: ignore[misc]
    entry["dtype"], entry["shape"] = "F4", [2 * (end - begin)]


def _torch_zip(raw: bytes) -> bytes:
    with tempfile.TemporaryFile() as f:
        torch.save({"w": torch.zeros(4)}, f)
        f.seek(0)
        return f.read()


def _torch_legacy(raw: bytes) -> bytes:
    with tempfile.TemporaryFile() as f:
        torch.save({"w": torch.zeros(4)}, f, _use_new_zipfile_serialization=False)
        f.seek(0)
        return f.read()


# name -> how a valid safetensors file becomes a bad one
FILE_MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "empty file": lambda raw: b"",
    "five bytes": lambda raw: raw[:5],
    "truncated data": lambda raw: raw[:-100],
    "truncated header": lambda raw: raw[: 8 + struct.unpack("<Q", raw[:8])[0] // 2],
    "random bytes": lambda raw: random.Random(6).randbytes(4096),
    "header length past EOF": lambda raw: struct.pack("<Q", len(raw) * 2) + raw[8:],
    "header length past bound": lambda raw: struct.pack("<Q", 2**40) + raw[8:],
    "header not JSON": lambda raw: join(b"{not json" + b" " * 100, split(raw)[1]),
    "header not UTF-8": lambda raw: join(b'{"\xff\xfe": 1}', split(raw)[1]),
    "header a JSON list": lambda raw: join(b"[1, 2, 3]", split(raw)[1]),
    "header nested 100000 deep": lambda raw: join(b"[" * 100_000 + b"]" * 100_000, split(raw)[1]),
    "entry not an object": rewrite(lambda h: h.__setitem__(tensors_by_offset(h)[0], [1, 2])),
    "offsets out of range": rewrite(_past_end),
    "overlapping tensors": rewrite(_overlap),
    "gap between tensors": _gap,
    "unknown dtype": rewrite(_set("dtype", "F12")),
    "dtype not a string": rewrite(_set("dtype", ["F32"])),
    "shape not a list": rewrite(_set("shape", "4x4")),
    "negative dimension": rewrite(_set("shape", [-1, 4])),
    "huge dimension": rewrite(_set("shape", [0, 2**70])),
    "offsets not a pair": rewrite(_set("data_offsets", [0])),
    "byte size disagrees with offsets": rewrite(_size_mismatch),
    "duplicate tensor name": _duplicate,
    "metadata value not a string": rewrite(lambda h: h.__setitem__("__metadata__", {"format": 1})),
    "metadata not an object": rewrite(lambda h: h.__setitem__("__metadata__", "pt")),
    "tensor named twice, one copy escaped": _escaped_duplicate,
    "entry with two dtype fields": _text_edit(b'{"dtype": ', b'{"dtype": "U8", "dtype": '),
    "two __metadata__ entries": _text_edit(b'{"__metadata__": ', b'{"__metadata__": {}, "__metadata__": '),
    "metadata key twice": _text_edit(b'{"format": ', b'{"format": "x", "format": '),
    "tensor name a lone surrogate": _first_renamed("\ud800"),
    "metadata value a lone surrogate": rewrite(lambda h: h.__setitem__("__metadata__", {"format": "\udc00"})),
    "NaN in an extra field": _text_edit(b'{"dtype": ', b'{"note": NaN, "dtype": '),
    "data offset -0": _text_edit(b'"data_offsets": [0, ', b'"data_offsets": [-0, '),
    "sub-byte dtype": rewrite(_sub_byte),
    "torch.save zip pickle renamed .safetensors": _torch_zip,
    "legacy pickle renamed .safetensors": _torch_legacy,
}


# The words each new header defect is refused with (the CLI runs above check the file is named).
HEADER_WORDS = {
    "gap between tensors": "leaves a gap before it",
    "tensor named twice, one copy escaped": "names tensor",
    "entry with two dtype fields": "names the key 'dtype' twice",
    "two __metadata__ entries": "names '__metadata__' twice",
    "metadata key twice": "__metadata__ names the key 'format' twice",
    "tensor name a lone surrogate": "tensor name '\\ud800' holds a lone UTF-16 surrogate",
    "metadata value a lone surrogate": "'\\udc00' holds a lone UTF-16 surrogate",
    "NaN in an extra field": "NaN is not JSON",
    "data offset -0": "data_offsets [-0.0,",
    "sub-byte dtype": "dtype F4 (4 bits per element) is not supported",
}


# mutation -> the words of the problem its Error line must say
FILE_WORDS = {
    "empty file": "only 0 bytes long",
    "five bytes": "only 5 bytes long",
    "truncated data": "lie past the end of the file",
    "truncated header": "does not fit a file of",
    "random bytes": "the safetensors format allows",
    "header length past EOF": "does not fit a file of",
    "header length past bound": "the safetensors format allows",
    "header not JSON": "header is not JSON",
    "header not UTF-8": "header is not UTF-8",
    "header a JSON list": "header is not a JSON object",
    "header nested 100000 deep": "nested too deeply",
    "entry not an object": "header entry is not an object",
    "offsets out of range": "lie past the end of the file",
    "overlapping tensors": "overlaps the tensor before it",
    "gap between tensors": "leaves a gap before it",
    "unknown dtype": "unknown dtype 'F12'",
    "dtype not a string": "unknown dtype ['F32']",
    "shape not a list": "is not a list of non-negative 64-bit integers",
    "negative dimension": "shape [-1, 4] is not a list of non-negative 64-bit integers",
    "huge dimension": "is not a list of non-negative 64-bit integers",
    "offsets not a pair": "is not a pair of non-negative integers",
    "byte size disagrees with offsets": "bytes but data_offsets",
    "duplicate tensor name": "twice",
    "metadata value not a string": "__metadata__ must map strings to strings",
    "metadata not an object": "__metadata__ must map strings to strings",
    "torch.save zip pickle renamed .safetensors": "is a PyTorch pickle file",
    "legacy pickle renamed .safetensors": "is a PyTorch pickle file",
    **HEADER_WORDS,
}


# --- cases: a base and an adapter, one of them bad --------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: `build(tmp, base, adapter)` copies the valid inputs into `tmp`, spoils one, and returns
    (base, adapter, the name the error must mention); `words` are the problem the error must say."""

    name: str
    build: Callable[[Path, Path, Path], tuple[Path, Path, str]]
    words: str
    misfit: bool = False  # readable, but the adapter does not fit: `check` answers 1, the others 2


def copies(tmp: Path, base: Path, adapter: Path) -> tuple[Path, Path]:
    return Path(shutil.copytree(base, tmp / "base")), Path(shutil.copytree(adapter, tmp / "adapter"))


def file_case(role: str, mutation: str) -> Case:
    def build(tmp: Path, base: Path, adapter: Path) -> tuple[Path, Path, str]:
        base, adapter = copies(tmp, base, adapter)
        target = base / WEIGHTS if role == "base" else adapter / ADAPTER_WEIGHTS
        target.write_bytes(FILE_MUTATIONS[mutation](target.read_bytes()))
        return base, adapter, f"{target.name}: is a PyTorch pickle" if "pickle" in mutation else target.name

    return Case(f"{role}: {mutation}", build, FILE_WORDS[mutation])


def sharded(tmp: Path, base: Path, adapter: Path) -> tuple[Path, Path, dict[str, object]]:
    """The base as an index + one shard, and the index document to spoil."""
    base, adapter = copies(tmp, base, adapter)
    shard = "model-00001-of-00001.safetensors"
    (base / WEIGHTS).rename(base / shard)
    with safe_open(base / shard, "pt") as f:
        names = list(f.keys())
    return base, adapter, {"metadata": {"total_size": 1}, "weight_map": dict.fromkeys(names, shard)}


def index_case(name: str, edit: Callable[[Path, dict[str, object]], object]) -> Case:
    def build(tmp: Path, base: Path, adapter: Path) -> tuple[Path, Path, str]:
        base, adapter, index = sharded(tmp, base, adapter)
        doc = edit(base, index)
        index_path = base / "model.safetensors.index.json"
        index_path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        return base, adapter, INDEX_CULPRITS.get(name, "model.safetensors.index.json")

    return Case(f"index: {name}", build, INDEX_WORDS[name])


def _point_first_at(target: Callable[[Path], str]) -> Callable[[Path, dict[str, object]], object]:
    """Point every tensor at a shard outside the directory (a valid copy, so only the escape is wrong)."""

    def edit(base: Path, index: dict[str, object]) -> object:
        outside = base.parent / "outside.safetensors"
        shutil.copyfile(base / "model-00001-of-00001.safetensors", outside)
        name = target(base)
        index["weight_map"] = dict.fromkeys(index["weight_map"], name)  # type: ignore[arg-type]
        return index

    return edit


def _symlink_out(base: Path) -> str:
    (base / "link.safetensors").symlink_to(base.parent / "outside.safetensors")
    return "link.safetensors"


def _wrong_shard(base: Path, index: dict[str, object]) -> object:
    weight_map = index["weight_map"]
    assert isinstance(weight_map, dict)
    weight_map["model.extra.weight"] = "model-00001-of-00001.safetensors"
    return index


def _renamed_shard(name: str) -> Callable[[Path, dict[str, object]], object]:
    """Every tensor in the one shard, listed under `name` (which names the real shard some other way)."""

    def edit(base: Path, index: dict[str, object]) -> object:
        if name.startswith("sub/"):
            (base / "sub").mkdir()
        index["weight_map"] = dict.fromkeys(index["weight_map"], name)  # type: ignore[arg-type]
        return index

    return edit


def _shard_replaced(make: Callable[[Path], None]) -> Callable[[Path, dict[str, object]], object]:
    def edit(base: Path, index: dict[str, object]) -> object:
        shard = base / "model-00001-of-00001.safetensors"
        shard.unlink()
        make(shard)
        return index

    return edit


def _listed_twice(base: Path, index: dict[str, object]) -> object:
    weight_map = index["weight_map"]
    assert isinstance(weight_map, dict)
    name = next(iter(weight_map))
    text = json.dumps(index)
    return text.replace(f'"{name}": ', f'"{name}": "elsewhere.safetensors", "{name}": ', 1).encode()


def _pickle_shard(base: Path, index: dict[str, object]) -> object:
    """The index points at a model.bin that is there: refused as a pickle, by name, never opened by torch."""
    (base / "model.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    return {"weight_map": dict.fromkeys(index["weight_map"], "model.bin")}  # type: ignore[call-overload]


# index edit -> the words of the problem its Error line must say
INDEX_WORDS = {
    "not JSON": "is not valid JSON",
    "not UTF-8": "is not valid JSON",
    "a JSON list": "must hold a JSON object",
    "weight_map missing": "field 'weight_map' must map tensor names to shard file names",
    "weight_map a list": "field 'weight_map' must map tensor names to shard file names",
    "shard name not a string": "field 'weight_map' must map tensor names to shard file names",
    "metadata not an object": "field 'metadata' must be an object",
    "shard escapes with ../": "points outside the checkpoint directory",
    "shard is an absolute path": "points outside the checkpoint directory",
    "shard is a symlink out": "points outside the checkpoint directory",
    "shard name with NUL": "is not a file name",
    "shard name empty": "is not a file name",
    "shard missing": "is missing",
    "tensor not in its shard": "whose header lacks it",
    "shard is a pickle": "is a PyTorch pickle file",
    "shard name with a trailing slash": "is not a normalised relative path",
    "shard name through sub/..": "is not a normalised relative path",
    "shard name through ./": "is not a normalised relative path",
    "shard name a lone surrogate": "holds a lone UTF-16 surrogate, which is not Unicode text",
    "tensor listed twice": "names the key 'lm_head.weight' twice in ['weight_map']",
    "shard is a named pipe": "is a named pipe, not a regular file",
    "shard is a symbolic link to itself": "a symbolic link that points to itself, or a loop of them",
}
# What the error names when it is not the index itself.
INDEX_CULPRITS = {
    "shard missing": "missing.safetensors",
    "shard is a pickle": "model.bin",
    "shard is a named pipe": "named pipe",
    "shard is a symbolic link to itself": "symbolic link",
}
INDEX_EDITS: dict[str, Callable[[Path, dict[str, object]], object]] = {
    "not JSON": lambda base, index: b"{'weight_map': ",
    "not UTF-8": lambda base, index: b'{"weight_map": "\xff"}',
    "a JSON list": lambda base, index: [index],
    "weight_map missing": lambda base, index: {"metadata": {}},
    "weight_map a list": lambda base, index: {"weight_map": ["model-00001-of-00001.safetensors"]},
    "shard name not a string": lambda base, index: {"weight_map": dict.fromkeys(index["weight_map"], 7)},  # type: ignore[arg-type]
    "metadata not an object": lambda base, index: {**index, "metadata": [1]},
    "shard escapes with ../": _point_first_at(lambda base: "../outside.safetensors"),
    "shard is an absolute path": _point_first_at(lambda base: str(base.parent / "outside.safetensors")),
    "shard is a symlink out": _point_first_at(_symlink_out),
    "shard name with NUL": lambda base, index: {"weight_map": dict.fromkeys(index["weight_map"], "a\x00b")},  # type: ignore[arg-type]
    "shard name empty": lambda base, index: {"weight_map": dict.fromkeys(index["weight_map"], "")},  # type: ignore[arg-type]
    "shard missing": lambda base, index: {"weight_map": dict.fromkeys(index["weight_map"], "missing.safetensors")},  # type: ignore[arg-type]
    "tensor not in its shard": _wrong_shard,
    "shard is a pickle": _pickle_shard,
    "shard name with a trailing slash": _renamed_shard("model-00001-of-00001.safetensors/"),
    "shard name through sub/..": _renamed_shard("sub/../model-00001-of-00001.safetensors"),
    "shard name through ./": _renamed_shard("./model-00001-of-00001.safetensors"),
    "shard name a lone surrogate": _renamed_shard("\udcff.safetensors"),
    "tensor listed twice": _listed_twice,
    "shard is a named pipe": _shard_replaced(os.mkfifo),
    "shard is a symbolic link to itself": _shard_replaced(lambda shard: shard.symlink_to(shard.name)),
}


def json_case(role: str, name: str, text: bytes, field: str, words: str) -> Case:
    def build(tmp: Path, base: Path, adapter: Path) -> tuple[Path, Path, str]:
        base, adapter = copies(tmp, base, adapter)
        target = base / "config.json" if role == "base" else adapter / "adapter_config.json"
        if text.startswith(b"+"):  # a field set to a wrong type in the real config
            doc = json.loads(target.read_text())
            doc[field] = json.loads(text[1:])
            target.write_text(json.dumps(doc))
        else:
            target.write_bytes(text)
        return base, adapter, f"{target.name}: field {field!r}" if text.startswith(b"+") else target.name

    return Case(f"{role} config: {name}", build, words)


def pickle_case(role: str) -> Case:
    """A directory holding only PyTorch pickles: refused with the safetensors advice, never opened."""

    def build(tmp: Path, base: Path, adapter: Path) -> tuple[Path, Path, str]:
        base, adapter = copies(tmp, base, adapter)
        if role == "base":
            (base / WEIGHTS).unlink()
            (base / "pytorch_model.bin").write_bytes(_torch_zip(b""))
        else:
            (adapter / ADAPTER_WEIGHTS).unlink()
            (adapter / "adapter_model.bin").write_bytes(_torch_zip(b""))
        return base, adapter, "safetensors"

    return Case(f"{role}: only a .bin pickle", build, "is a PyTorch pickle file")


def pickle_file_case() -> Case:
    def build(tmp: Path, base: Path, adapter: Path) -> tuple[Path, Path, str]:
        base, adapter = copies(tmp, base, adapter)
        weights = base / "weights.pt"
        weights.write_bytes(_torch_zip(b""))
        return weights, adapter, "safetensors"

    return Case("base: a .pt file", build, "is a PyTorch pickle file")


def pipe_case(name: str) -> Case:
    """A named pipe under the name of a file the base directory's reader opens: refused, never waited on."""

    def build(tmp: Path, base: Path, adapter: Path) -> tuple[Path, Path, str]:
        base, adapter = copies(tmp, base, adapter)
        (base / name).unlink(missing_ok=True)
        os.mkfifo(base / name)
        return base, adapter, f"{name}: is a named pipe"

    return Case(f"base: {name} a named pipe", build, "is a named pipe")


def shape_case(name: str, edit: Callable[[dict[str, torch.Tensor]], None], words: str) -> Case:
    """A valid adapter file whose factor shapes do not fit the base."""

    def build(tmp: Path, base: Path, adapter: Path) -> tuple[Path, Path, str]:
        base, adapter = copies(tmp, base, adapter)
        tensors = load_file(adapter / ADAPTER_WEIGHTS)
        edit(tensors)
        save_file(tensors, adapter / ADAPTER_WEIGHTS)
        return base, adapter, "q_proj"

    return Case(f"adapter shapes: {name}", build, words, misfit=True)


def _reshape(key: str, rows: int, cols: int) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, torch.ones(rows, cols))


Q_PROJ_B = Q_PROJ_A.replace("lora_A", "lora_B")
CASES: list[Case] = [
    *(file_case(role, mutation) for role in ("base", "adapter") for mutation in FILE_MUTATIONS),
    *(index_case(name, edit) for name, edit in INDEX_EDITS.items()),
    json_case("base", "not JSON", b'{"model_type": llama', "config.json", "is not valid JSON"),
    json_case("base", "a JSON list", b"[]", "config.json", "must hold a JSON object"),
    json_case("base", "model_type a number", b"+5", "model_type", "must be a string, not 5"),
    json_case("base", "model_type a list", b'+["llama"]', "model_type", "must be a string"),
    json_case("adapter", "not JSON", b'{"r": 4,', "adapter_config.json", "is not valid JSON"),
    json_case("adapter", "not UTF-8", b'{"r": "\xff"}', "adapter_config.json", "is not valid JSON"),
    json_case("adapter", "r a string", b'+"4"', "r", "must be a positive integer, not '4'"),
    json_case("adapter", "r zero", b"+0", "r", "must be a positive integer, not 0"),
    json_case("adapter", "r past a double's integers", b"+9007199254740992", "r", "must be an integer below 2**53"),
    json_case("adapter", "lora_alpha a list", b"+[8]", "lora_alpha", "must be a finite number"),
    json_case("adapter", "lora_alpha 2**1100", b"+" + str(2**1100).encode(), "lora_alpha", "must be a finite number"),
    json_case("adapter", "target_modules a number", b"+3", "target_modules", "must be a string, a list of strings"),
    json_case(
        "adapter", "target_modules not a regex", b'+"(q_proj"', "target_modules", "not a valid regular expression"
    ),
    json_case("adapter", "exclude_modules not a regex", b'+"[x"', "exclude_modules", "not a valid regular expression"),
    json_case("adapter", "use_rslora a string", b'+"yes"', "use_rslora", "must be true or false"),
    json_case(
        "adapter", "rank_pattern a list", b"+[1]", "rank_pattern", "mapping module patterns to positive integers"
    ),
    json_case("adapter", "rank_pattern of 0", b'+{"q_proj": 0}', "rank_pattern", "to positive integers"),
    json_case("adapter", "rank_pattern key not a regex", b'+{"q_(proj": 4}', "rank_pattern", "not a valid regular"),
    json_case("adapter", "alpha_pattern key not a regex", b'+{"q_(proj": 4}', "alpha_pattern", "not a valid regular"),
    json_case(
        "adapter", "layers_to_transform a string", b'+"0"', "layers_to_transform", "an integer, a list of integers"
    ),
    pickle_case("base"),
    pickle_case("adapter"),
    pickle_file_case(),
    pipe_case("model.safetensors.index.json"),
    pipe_case("model.safetensors"),
    pipe_case("config.json"),
    shape_case("lora_A in-features too wide", _reshape(Q_PROJ_A, 4, 33), "does not fit the base shape [32, 32]"),
    shape_case("lora_B out-features too tall", _reshape(Q_PROJ_B, 33, 4), "does not fit the base shape [32, 32]"),
    shape_case("lora_A rank differs from lora_B", _reshape(Q_PROJ_A, 3, 32), "lora_B has rank 4 but lora_A has rank 3"),
    shape_case("lora_A a vector", lambda t: t.__setitem__(Q_PROJ_A, torch.ones(32)), "not a matrix of LoRA factors"),
    shape_case("lora_B a vector", lambda t: t.__setitem__(Q_PROJ_B, torch.ones(32)), "not a matrix of LoRA factors"),
]


# --- running them -----------------------------------------------------------------------------------------


def command_line(command: str, base: Path, adapter: Path, out: Path) -> list[str]:
    return [command, str(base), str(adapter)] + ([] if command == "check" else ["-o", str(out)])


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(
    case: Case,
    command: str,
    llama_dir: Path,
    llama_adapter: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, adapter, culprit = case.build(tmp_path / "in", llama_dir, llama_adapter)
    before = tree_hashes(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    code, stdout, stderr = run_cli(command_line(command, base, adapter, out_dir / "result"), capsys)

    if case.misfit and command == "check" and code == 1:  # found, not unreadable: check's own answer
        assert culprit in stderr and case.words in stderr, stderr
    else:
        assert code == 2, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, stderr
        assert culprit in errors[0] and case.words in errors[0], errors[0]
        assert "internal error" not in errors[0]
    assert "Traceback" not in stdout + stderr
    assert list(out_dir.iterdir()) == []  # no OUT, no temporary
    assert tree_hashes(tmp_path / "in") == before


def test_pickle_is_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pickle whose loading would leave a mark is refused before any byte of it is interpreted."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "model.safetensors"
    torch.save({"w": Payload()}, evil)
    code, _, stderr = run_cli(["check", str(evil), str(evil)], capsys)
    assert code == 2
    assert "convert it to safetensors" in stderr
    assert not marker.exists()


def test_a_valid_header_of_length_640_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    """Length 640 starts with the bytes of pickle protocol 2 (0x80 0x02); the JSON after it decides."""
    header = {"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}
    text = json.dumps(header).encode()
    text += b" " * (640 - len(text))
    path = tmp_path / "x.safetensors"
    path.write_bytes(join(text, b"\x00" * 4))
    assert [t.name for t in read_header(path).tensors] == ["w"]


# What safetensors.safe_open accepts and we refuse, by name: it keeps the last of duplicate keys silently (a
# tensor named twice is a silent misread), and we have no byte size for F4.
LIBRARY_ACCEPTS = {"tensor named twice, one copy escaped", "metadata key twice", "sub-byte dtype"}


@pytest.mark.parametrize("mutation", sorted(HEADER_WORDS))
def test_header_defects_are_refused_in_words(mutation: str, tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(FILE_MUTATIONS[mutation](VALID))
    with pytest.raises(LorasurgeonError) as error:
        read_header(path)
    assert str(error.value).startswith(f"{path}: ")
    assert HEADER_WORDS[mutation] in str(error.value)
    if mutation in LIBRARY_ACCEPTS:
        with safe_open(path, "pt") as f:
            assert f.keys()
    else:
        with pytest.raises(SafetensorError), safe_open(path, "pt"):
            pass


# --- hypothesis: random damage to valid files -------------------------------------------------------------


def small_file() -> bytes:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/x.safetensors", metadata={"format": "pt"})
        return Path(f"{tmp}/x.safetensors").read_bytes()


VALID = small_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


@st.composite
def damaged(draw: st.DrawFn, valid: bytes, hot_end: int) -> bytes:
    """`valid` with a few byte edits, mostly inside its first `hot_end` bytes, maybe truncated or extended."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "insert", "delete"]))
        at = draw(st.integers(0, max(0, min(len(data), hot_end) - 1)))
        if kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at : at + draw(st.integers(1, 8))]
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data[:cut]) + draw(st.binary(max_size=4))


def refused(action: Callable[[], object]) -> str | None:
    """The message of the LorasurgeonError `action` raises, or None when it succeeds (any other error fails)."""
    try:
        action()
    except LorasurgeonError as e:
        return str(e)
    return None


def reads_like_safetensors(path: Path) -> None:
    """Our reading of a file we accepted must agree with the safetensors library's."""
    header = read_header(path)
    with safe_open(path, "pt") as f:
        theirs = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert {t.name: (t.dtype, list(t.shape)) for t in header.tensors} == theirs
    for t in header.tensors:
        assert header.data_start <= t.start <= t.end <= path.stat().st_size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=damaged(VALID, HEADER_END))
def test_header_reader_reads_correctly_or_refuses(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        refusal = refused(lambda: read_header(path))
        if refusal is not None:
            assert refusal.startswith(str(path)), refusal
        else:
            reads_like_safetensors(path)


INDEX = json.dumps(
    {"metadata": {"total_size": 30}, "weight_map": {"a": "x.safetensors", "b": "x.safetensors"}}
).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=damaged(INDEX, len(INDEX)))
def test_index_reader_reads_correctly_or_refuses(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ckpt"
        root.mkdir()
        (root / "x.safetensors").write_bytes(VALID)
        (Path(tmp) / "outside.safetensors").write_bytes(VALID)
        (root / "model.safetensors.index.json").write_bytes(raw)
        refusal = refused(lambda: Checkpoint.open(root).close())
        if refusal is not None:
            assert str(root) in refusal, refusal
        else:
            with Checkpoint.open(root) as ckpt:
                assert sorted(ckpt.tensors) == ["a", "b"]
                assert {info.path.resolve() for info in ckpt.tensors.values()} == {(root / "x.safetensors").resolve()}


@pytest.mark.parametrize("mutation", sorted(HEADER_WORDS))
def test_report_refuses_header_defects_with_one_line(
    mutation: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`report` printed an internal error for a tensor name that is a lone surrogate (issue 12)."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(FILE_MUTATIONS[mutation](VALID))
    code, stdout, stderr = run_cli(["report", str(path)], capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(errors) == 1 and HEADER_WORDS[mutation] in errors[0], stderr
    assert "internal error" not in stderr and "Traceback" not in stdout + stderr
