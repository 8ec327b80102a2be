"""The project's own fuzzing (issue 12): mutated headers, indexes, directory layouts, adapter files and configs.

Two properties, each in a quick run (a few hundred examples) and a `slow` one (5,000 or more):
- the header reader accepts exactly what `safetensors.safe_open` accepts, both ways, and reads the same
  names, dtypes, shapes and metadata; its only refusals of what the library reads are by name (a key
  named twice anywhere, which the library settles silently by keeping the last; the sub-byte dtypes);
- every reading command (`report`, `check`, `merge --dry-run`, `merge`) through the real entry point, on
  inputs with one defect: exit 2 with exactly one `Error:` line (or 1 from check when the adapter merely
  does not fit), or a success whose OUT opens with safe_open; never a traceback or an internal error, never
  a hang, nothing left beside OUT, every input byte and link unchanged.
Mutations are drawn as JSON structure (duplicate keys, escaped spellings, extra fields, odd numbers, lone
surrogates, every dtype) and as bytes (edits, truncation, wrong lengths).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import run_cli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorasurgeon.errors import LorasurgeonError
from lorasurgeon.header import read_header

HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("fuzz", max_examples=300, deadline=None, suppress_health_check=HEALTH)
settings.register_profile("fuzz-slow", max_examples=5000, deadline=None, suppress_health_check=HEALTH)
QUICK, SLOW = settings.get_profile("fuzz"), settings.get_profile("fuzz-slow")

# Every dtype the safetensors format has, with its size in bits (F4 and F6 take less than a byte).
BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
SUB_BYTE = {"F4", "F6_E2M3", "F6_E3M2"}


# --- JSON as a tree we spell ourselves (so that keys may repeat and numbers be anything) -------------------


@dataclass
class Obj:
    pairs: list[tuple[str, Any]]


@dataclass
class Num:
    text: str  # the number as written: "4", "-0", "1e400", "NaN", "18446744073709551616", ...


def spell(node: Any, style: dict[str, bool]) -> str:
    """JSON text of `node`; `escape` writes every non-ASCII character and some ASCII ones as \\u escapes
    (a lone surrogate can only be written so), `spaced` puts whitespace around the separators."""
    colon, comma = (" : ", " ,\n ") if style["spaced"] else (":", ",")
    if isinstance(node, Obj):
        return "{" + comma.join(spell_str(k, style) + colon + spell(v, style) for k, v in node.pairs) + "}"
    if isinstance(node, list):
        return "[" + comma.join(spell(v, style) for v in node) + "]"
    if isinstance(node, Num):
        return node.text
    if isinstance(node, str):
        return spell_str(node, style)
    return json.dumps(node)  # True, False, None, int


def spell_str(text: str, style: dict[str, bool]) -> str:
    out = []
    for ch in text:
        if ch in '"\\' or ord(ch) < 0x20:
            out.append(json.dumps(ch)[1:-1])
        elif (style["escape"] and (ord(ch) > 0x7E or ch in "_e")) or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else json.dumps(ch)[1:-1])
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


PLAIN_NAMES = ["a", "b.weight", "layers.0.q", "é", "😀", "x y", ""]
NAMES = st.sampled_from(PLAIN_NAMES * 3 + ["__metadata__", "\ud800", "\udc00x", "\ud83d\ude00"])
NUMBERS = st.one_of(
    st.integers(-5, 70).map(str),
    st.sampled_from(["-0", "0.0", "4e0", "1e400", "-1e400", "NaN", "Infinity", "18446744073709551615"]),
    st.sampled_from(["18446744073709551616", "1e-400", "-9223372036854775809"]),
    st.sampled_from([300, 400, 5000]).map(lambda digits: "9" * digits),  # a double's range, Python's int limit
).map(Num)
LEAVES = st.one_of(NUMBERS, NAMES, st.booleans(), st.none(), st.text(max_size=4))


def json_values() -> st.SearchStrategy[Any]:
    nested = st.recursive(
        LEAVES,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.lists(st.tuples(NAMES, inner), max_size=3).map(lambda p: Obj(list(p)))
        ),
        max_leaves=5,
    )
    deep = st.integers(120, 135).map(lambda n: Num("[" * n + "]" * n))  # around serde_json's depth limit
    return st.one_of(nested, deep)


# --- valid headers, then mutated ----------------------------------------------------------------------------


@st.composite
def tensor_specs(draw: st.DrawFn) -> list[tuple[str, str, list[int]]]:
    """A few tensors of any dtype with whole-byte sizes (F4/F6 shapes chosen so their bits fill bytes)."""
    specs = []
    for name in draw(st.lists(NAMES.filter(lambda n: n != "__metadata__"), min_size=1, max_size=3, unique=True)):
        dtype = draw(st.sampled_from(sorted(BITS)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        if BITS[dtype] < 8:
            shape = [*shape, 4]  # 4 elements of 4 or 6 bits: 2 or 3 bytes per row
        specs.append((name, dtype, shape))
    return specs


def layout(specs: list[tuple[str, str, list[int]]]) -> tuple[list[tuple[str, Obj]], int]:
    pairs, offset = [], 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * BITS[dtype] // 8
        pairs.append((name, Obj([("dtype", dtype), ("shape", list(shape)), ("data_offsets", [offset, offset + size])])))
        offset += size
    return pairs, offset


MUTATIONS = [
    "duplicate tensor",
    "duplicate field",
    "extra field",
    "drop field",
    "replace field",
    "shift offsets",
    "metadata",
    "duplicate metadata",
    "huge dims",
]


@st.composite
def mutate_pairs(draw: st.DrawFn, pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Apply 0-3 structural mutations to the top-level pairs (entries are Obj)."""
    pairs = [(k, Obj(list(v.pairs)) if isinstance(v, Obj) else v) for k, v in pairs]
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        entries = [i for i, (k, v) in enumerate(pairs) if isinstance(v, Obj) and k != "__metadata__"]
        at = draw(st.sampled_from(entries)) if entries else None
        if kind == "duplicate tensor" and at is not None:
            name, entry = pairs[at]
            copy = Obj(list(entry.pairs)) if draw(st.booleans()) else Obj([("dtype", "U8"), ("shape", [0])])
            pairs.insert(draw(st.integers(0, len(pairs))), (name, copy))
        elif kind in ("duplicate field", "extra field", "drop field", "replace field") and at is not None:
            fields = pairs[at][1].pairs
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "note", *[k for k, _ in fields]]))
            if kind == "drop field":
                fields[:] = [(k, v) for k, v in fields if k != key]
            elif kind == "replace field":
                fields[:] = [(k, draw(json_values()) if k == key else v) for k, v in fields]
            else:
                fields.insert(draw(st.integers(0, len(fields))), (key, draw(json_values())))
        elif kind == "shift offsets" and at is not None:
            fields = pairs[at][1].pairs
            delta = draw(st.sampled_from([-1, 1, 4, 2**64]))
            fields[:] = [(k, _shifted(v, delta) if k == "data_offsets" else v) for k, v in fields]
        elif kind in ("metadata", "duplicate metadata"):
            value = draw(st.one_of(json_values(), st.lists(st.tuples(NAMES, NAMES), max_size=3).map(Obj)))
            if kind == "duplicate metadata":
                value = Obj([("format", "pt"), ("format", draw(NAMES))])
            pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", value))
        elif kind == "huge dims" and at is not None:
            dims = draw(st.lists(st.sampled_from([0, 1, 2**32, 2**62, 2**63, 2**64 - 1, 2**64]), min_size=1))
            fields = pairs[at][1].pairs
            fields[:] = [(k, dims if k == "shape" else v) for k, v in fields]
    return pairs


def _shifted(offsets: Any, delta: int) -> Any:
    return (
        [x + delta for x in offsets] if isinstance(offsets, list) and all(type(x) is int for x in offsets) else offsets
    )


@st.composite
def header_files(draw: st.DrawFn) -> bytes:
    """A safetensors file: a valid one, mutated as JSON structure, then maybe as bytes."""
    pairs, size = layout(draw(tensor_specs()))
    if draw(st.booleans()):
        pairs.insert(0, ("__metadata__", Obj([("format", "pt")])))
    pairs = draw(mutate_pairs(pairs))
    style = {"escape": draw(st.booleans()), "spaced": draw(st.booleans())}
    text = spell(Obj(pairs), style).encode("utf-8", "surrogatepass")  # only escaped surrogates survive below
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        text = spell(Obj(pairs), {**style, "escape": True}).encode()
    text = draw(st.sampled_from([b"", b" ", b"\n"])) + text + b" " * draw(st.integers(0, 7))
    data = bytes(size) + bytes(draw(st.sampled_from([0] * 8 + [1, 8])))
    raw = struct.pack("<Q", len(text) + draw(st.sampled_from([0] * 18 + [-1, 1]))) + text + data
    return draw(damaged(raw)) if draw(st.integers(0, 5)) == 0 else raw


@st.composite
def damaged(draw: st.DrawFn, raw: bytes) -> bytes:
    """`raw` with one to four byte edits (mostly in the header), maybe cut short."""
    data = bytearray(raw)
    hot = min(len(data), 8 + struct.unpack("<Q", raw[:8])[0]) if len(raw) >= 8 else len(data)
    for _ in range(draw(st.integers(1, 4))):
        end = min(hot, len(data))  # deletions shorten it
        at = draw(st.integers(min(8, end - 1) if end else 0, max(0, end - 1)))  # the length prefix: rarely
        kind = draw(st.sampled_from(["set", "insert", "delete"]))
        if kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif data:
            del data[at : at + draw(st.integers(1, 6))]
    return bytes(data[: draw(st.one_of(st.none(), st.integers(0, len(data))))])


# --- the two header readers, held to each other ---------------------------------------------------------------


def library_reading(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]] | None:
    try:
        with safe_open(path, "pt") as f:
            tensors = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
            return tensors, f.metadata() or {}
    except SafetensorError:
        return None


def refusal_the_library_does_not_make(raw: bytes) -> bool:
    """What we refuse by name and safe_open reads (found independently of our reader): a key named twice in
    any object once escapes are decoded, or a tensor of a sub-byte dtype."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            found.append("duplicate")
        return dict(items)

    (length,) = struct.unpack("<Q", raw[:8])
    doc = json.loads(raw[8 : 8 + length].decode(), object_pairs_hook=pairs)
    sub_byte = any(isinstance(v, dict) and v.get("dtype") in SUB_BYTE for k, v in doc.items() if k != "__metadata__")
    return bool(found) or sub_byte


def our_reading(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]] | str:
    """Our header reader's view of `path`, or its refusal (any other exception fails the test)."""
    try:
        header = read_header(path)
    except LorasurgeonError as e:
        return str(e)
    return {t.name: (t.dtype, list(t.shape)) for t in header.tensors}, header.metadata


def check_header(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        theirs, ours = library_reading(path), our_reading(path)
        event(f"library {'reads' if theirs else 'refuses'}, we {'refuse' if isinstance(ours, str) else 'read'}")
        if isinstance(ours, str):
            assert ours.startswith(f"{path}: "), ours
            assert theirs is None or refusal_the_library_does_not_make(raw), (ours, theirs)
        else:
            assert ours == theirs, "we read a file differently from safetensors, or one it refuses"


@QUICK
@given(raw=header_files())
def test_header_reader_agrees_with_safetensors(raw: bytes) -> None:
    check_header(raw)


@pytest.mark.slow
@SLOW
@given(raw=header_files())
def test_header_reader_agrees_with_safetensors_at_length(raw: bytes) -> None:
    check_header(raw)


# --- the commands, on inputs with one defect ---------------------------------------------------------------

Q, V, NORM = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight", "model.norm.weight"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
CONFIG = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
    "fan_in_fan_out": False,
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "base",
    "use_rslora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
}


def build_inputs(root: Path) -> tuple[Path, Path]:
    """A sharded Hugging Face directory of three tiny tensors and a PEFT adapter on two of them (B != 0): small
    enough that a merge costs microseconds of torch, so thousands of examples run in minutes."""
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({Q: torch.randn(4, 4, generator=g)}, base / SHARDS[0], metadata={"format": "pt"})
    second = {V: torch.randn(4, 4, generator=g).bfloat16(), NORM: torch.ones(4)}
    save_file(second, base / SHARDS[1], metadata={"format": "pt"})
    weight_map = {Q: SHARDS[0], V: SHARDS[1], NORM: SHARDS[1]}
    (base / INDEX).write_text(json.dumps({"metadata": {"total_size": 112}, "weight_map": weight_map}, indent=2))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (base / "tokenizer.json").write_text('{"model": {}}')
    factors = {}
    for module in ("q_proj", "v_proj"):
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        factors[f"{key}.lora_A.weight"] = torch.randn(2, 4, generator=g)
        factors[f"{key}.lora_B.weight"] = torch.randn(4, 2, generator=g)
    save_file(factors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(CONFIG, indent=2))
    return base, adapter


def header_pairs(raw: bytes) -> tuple[list[tuple[str, Any]], bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    doc = json.loads(raw[8 : 8 + length])
    pairs = [(k, Obj(list(v.items())) if isinstance(v, dict) else v) for k, v in doc.items()]
    return pairs, raw[8 + length :]


@st.composite
def mutated_file(draw: st.DrawFn, raw: bytes) -> bytes:
    """A real safetensors file of the inputs, its header mutated as JSON structure or as bytes."""
    pairs, data = header_pairs(raw)
    style = {"escape": draw(st.booleans()), "spaced": draw(st.booleans())}
    text = spell(Obj(draw(mutate_pairs(pairs))), {**style, "escape": True}).encode()
    mutated = struct.pack("<Q", len(text)) + text + data
    return draw(damaged(mutated)) if draw(st.integers(0, 3)) == 0 else mutated


SHARD_NAMES = [
    "../outside.safetensors",
    "/etc/hostname",
    f"{SHARDS[0]}/",
    f"sub/../{SHARDS[0]}",
    f"./{SHARDS[0]}",
    "",
    "a\x00b",
    "missing.safetensors",
    "pytorch_model.bin",
    "\udcff.safetensors",
    SHARDS[1],
]


@st.composite
def index_edit(draw: st.DrawFn, text: str) -> bytes:
    doc = json.loads(text)
    kind = draw(st.sampled_from(["rename", "drop", "add", "twice", "metadata", "replace", "bytes"]))
    names = list(doc["weight_map"])
    name = draw(st.sampled_from(names))
    if kind == "rename":
        doc["weight_map"][name] = draw(st.sampled_from(SHARD_NAMES))
    elif kind == "drop":
        del doc["weight_map"][name]
    elif kind == "add":
        doc["weight_map"][draw(NAMES)] = draw(st.sampled_from([*SHARDS, *SHARD_NAMES]))
    elif kind == "metadata":  # spelled in place: the value may be no number Python's json can read back
        doc["metadata"] = "METADATA"
        value = spell(draw(json_values()), {"escape": True, "spaced": False})
        return json.dumps(doc, indent=2).replace('"METADATA"', value).encode()
    elif kind == "replace":
        return spell(Obj([("weight_map", draw(json_values()))]), {"escape": True, "spaced": False}).encode()
    out = json.dumps(doc, indent=2).encode()
    if kind == "twice":
        out = out.replace(f'"{name}": '.encode(), f'"{name}": "{SHARDS[0]}", "{name}": '.encode(), 1)
    if kind == "bytes":
        out = draw(damaged(struct.pack("<Q", len(out)) + out))[8:]
    return out


# adapter_config.json values, the ones that once reached internal errors (issue 12) among them: an invalid
# regex, a rank_pattern of 0, an alpha past a double's range.
CONFIG_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, -1, 3.5, 1e300, 2**1100, "q_proj", ".*", "", "q_proj(", "(", None, True, [], {}]),
    st.sampled_from([["q_proj"], [0, 1], {"q_proj": 4}, {"q_proj": "x"}, {"q_proj": -1}, {"q_proj": 0}, {"(": 4}]),
    st.sampled_from([["q_proj", 1], "LORA", "LOHA", "CAUSAL_LM"]),
)


@st.composite
def config_edit(draw: st.DrawFn, text: str) -> bytes:
    doc = json.loads(text)
    kind = draw(st.sampled_from(["set", "drop", "twice", "bytes"]))
    key = draw(st.sampled_from(sorted(CONFIG)))
    if kind == "set":
        doc[key] = draw(CONFIG_VALUES)
        if key == "lora_alpha" and isinstance(doc[key], float):
            doc[key] = 8.0
    elif kind == "drop":
        doc.pop(key)
    out = json.dumps(doc, indent=2).encode()
    if kind == "twice":
        out = out.replace(f'"{key}": '.encode(), f'"{key}": 16, "{key}": '.encode(), 1)
    if kind == "bytes":
        out = draw(damaged(struct.pack("<Q", len(out)) + out))[8:]
    return out


LAYOUT_NAMES = ["config.json", "tokenizer.json", INDEX, SHARDS[0], "notes.txt", "model.safetensors"]


@st.composite
def layout_edit(draw: st.DrawFn) -> tuple[str, str, str]:
    """(what, name, how): put something odd under a name of the base directory."""
    what = draw(st.sampled_from(["pipe", "loop", "outside", "dangling", "dir link", "inside link", "deep", "hidden"]))
    return what, draw(st.sampled_from(LAYOUT_NAMES)), draw(st.sampled_from(["a", "b/c", "d/e/f/g"]))


def apply_layout(base: Path, what: str, name: str, how: str) -> None:
    target = base / name
    if what in ("deep", "hidden"):
        folder = base / (f".{how}" if what == "hidden" else how)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((base / SHARDS[0]).read_bytes() if name.endswith("safetensors") else b"{}")
        return
    if target.exists() or target.is_symlink():
        target.unlink()
    if what == "pipe":
        os.mkfifo(target)
    elif what == "loop":
        target.symlink_to(name)
    elif what == "outside":
        target.symlink_to(base.parent / "outside.safetensors")
    elif what == "dangling":
        target.symlink_to(base / "gone")
    elif what == "dir link":
        (base / "sub").mkdir(exist_ok=True)
        target.symlink_to("sub")
    else:  # a link inside the directory: allowed, and it must read like the file it points to
        (base / "sub").mkdir(exist_ok=True)
        shutil.copyfile(base.parent / "outside.safetensors", base / "sub" / "copy")
        target.symlink_to("sub/copy")


@st.composite
def defects(draw: st.DrawFn) -> tuple[str, Any]:
    role = draw(st.sampled_from(["base shard", "adapter file", "index", "adapter config", "layout"]))
    return role, draw(st.integers(0, 1)) if role == "base shard" else None


def snapshot_tree(root: Path) -> dict[str, str]:
    """Every entry under `root` without following links or opening anything but regular files."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            if os.path.islink(path):
                out[str(path)] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path)] = f"mode:{mode:o}"
    return out


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """A blocking read (a named pipe opened for reading) fails the example instead of hanging the run."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    build_inputs(root)
    shutil.copyfile(root / "base" / SHARDS[0], root / "outside.safetensors")
    return root


def run_commands(data: st.DataObject, pristine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    role, which = data.draw(defects(), label="defect")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        shutil.copytree(pristine, root, symlinks=True)
        base, adapter = root / "base", root / "adapter"
        if role == "base shard":
            shard = base / SHARDS[which]
            shard.write_bytes(data.draw(mutated_file(shard.read_bytes()), label="shard"))
        elif role == "adapter file":
            weights = adapter / "adapter_model.safetensors"
            weights.write_bytes(data.draw(mutated_file(weights.read_bytes()), label="adapter file"))
        elif role == "index":
            (base / INDEX).write_bytes(data.draw(index_edit((base / INDEX).read_text()), label="index"))
        elif role == "adapter config":
            config = adapter / "adapter_config.json"
            config.write_bytes(data.draw(config_edit(config.read_text()), label="config"))
        else:
            apply_layout(base, *data.draw(layout_edit(), label="layout"))
        before = snapshot_tree(root)
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        out = out_dir / "merged"
        report_target = adapter if role.startswith("adapter") else base
        commands = [
            ["report", str(report_target)],
            ["check", str(base), str(adapter)],
            ["merge", str(base), str(adapter), "-o", str(out), "--dry-run"],
            ["merge", str(base), str(adapter), "-o", str(out)],
        ]
        for args in commands:
            with deadline(30):
                code, stdout, stderr = run_cli(args, capsys)
            event(f"{args[0]}{' --dry-run' if '--dry-run' in args else ''}: exit {code}")
            judge(args, code, stdout + stderr, out)
        assert snapshot_tree(root) == before, "an input was changed"


def judge(args: list[str], code: int, output: str, out: Path) -> None:
    assert "Traceback" not in output and "internal error" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    if code == 2:
        assert len(errors) == 1, output
    else:
        assert code == 0 or (code == 1 and args[0] == "check"), (code, output)
        assert not errors, output
    leftovers = sorted(p.name for p in out.parent.iterdir())
    if args[0] == "merge" and "--dry-run" not in args and code == 0:
        assert leftovers == ["merged"], leftovers
        opens_everywhere(out)
    else:
        assert leftovers == [], leftovers


def opens_everywhere(out: Path) -> None:
    """OUT as a loader finds it: every safetensors file opens with safe_open and every tensor reads; the index
    names only files that exist; nothing in OUT is a link."""
    files = [out] if out.is_file() else sorted(p for p in out.rglob("*"))
    assert not any(p.is_symlink() for p in files)
    for path in files:
        if path.name.endswith(".safetensors") and (path == out or path.parent == out):  # the weights OUT has
            with safe_open(path, "pt") as f:
                for key in f.keys():  # noqa: SIM118
                    f.get_tensor(key)
    if (out / INDEX).is_file():
        assert all((out / name).is_file() for name in json.loads((out / INDEX).read_text())["weight_map"].values())


def test_the_fuzzed_inputs_merge_as_they_are(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The unmutated inputs are a working merge, so the examples above start from success."""
    base, adapter = pristine / "base", pristine / "adapter"
    code, _, stderr = run_cli(["merge", str(base), str(adapter), "-o", str(tmp_path / "out")], capsys)
    assert code == 0, stderr
    with safe_open(tmp_path / "out" / SHARDS[0], "pt") as merged, safe_open(base / SHARDS[0], "pt") as original:
        assert not torch.equal(merged.get_tensor(Q), original.get_tensor(Q))
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": {}}'


@QUICK
@given(data=st.data())
def test_commands_refuse_cleanly_or_write_what_loads(
    data: st.DataObject, pristine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_commands(data, pristine, capsys)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_commands_refuse_cleanly_or_write_what_loads_at_length(
    data: st.DataObject, pristine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_commands(data, pristine, capsys)


# --- internal errors this fuzzing found in the adapter formats (issue 12), now each a named problem -----------


def _config_with(**fields: Any) -> Callable[[Path], None]:
    def edit(adapter: Path) -> None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        config.update(fields)
        text = json.dumps(config).replace('"HUGE"', str(2**1100))
        (adapter / "adapter_config.json").write_text(text)

    return edit


def _one_dimensional_lora_b(adapter: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    pairs, data = header_pairs(weights.read_bytes())
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    pairs = [(k, Obj([(f, [8] if f == "shape" else v) for f, v in e.pairs]) if k == key else e) for k, e in pairs]
    text = spell(Obj(pairs), {"escape": False, "spaced": False}).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data)


ONCE_INTERNAL_ERRORS = {
    "invalid regex in target_modules": _config_with(target_modules="q_proj("),
    "invalid regex in exclude_modules": _config_with(exclude_modules="("),
    "invalid regex as a rank_pattern key": _config_with(rank_pattern={"(": 4}),
    "rank_pattern value 0": _config_with(rank_pattern={"q_proj": 0}),
    "lora_alpha 2**1100": _config_with(lora_alpha="HUGE"),
    "r 2**1100": _config_with(r="HUGE"),
    "1-D lora_B in the header": _one_dimensional_lora_b,
}


@pytest.mark.parametrize("bug", sorted(ONCE_INTERNAL_ERRORS))
def test_once_internal_errors_of_the_adapter_formats_are_named(
    bug: str, pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(shutil.copytree(pristine, tmp_path / "in", symlinks=True))
    ONCE_INTERNAL_ERRORS[bug](root / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    for args in (["check", str(root / "base"), str(root / "adapter")], ["report", str(root / "adapter")]):
        code, stdout, stderr = run_cli(args, capsys)
        if args[0] == "check":
            assert code in (1, 2), stderr
        else:  # report describes what merge would refuse, and exits 0 without --fail-on
            assert code == 2 or (code == 0 and "\nerror: " in "\n" + stderr), stderr
        judge(args, code, stdout + stderr, out / "merged")


FOOLS = {
    "a duplicate whose first copy has no data_offsets": b'{"a":{"dtype":"U8"},"a":ENTRY}',
    "a duplicate beside an escaped quote and colon": b'{"__metadata__":{"k":"\\":"},"a":ENTRY,"a":ENTRY}',
    "a duplicate field beside an extra one elsewhere": (
        b'{"a":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]},'
        b'"b":{"dtype":"U8","shape":[0],"data_offsets":[4,4],"x":1}}'
    ),
    "a duplicate with whitespace before a colon": b'{"a" :ENTRY,"a":ENTRY}',
    "a duplicate field spelled with an escape": b'{"a":{"dtype":"U8","shape":[4],"data\\u005foffsets":[0,4],'
    b'"data_offsets":[0,4]}}',
    "a -0 offset": b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[-0,4]},"__metadata__":{"date":"2024-01-05"}}',
    "NaN nested in an extra field": b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"x":[NaN]}}',
}


@pytest.mark.parametrize("text", list(FOOLS.values()), ids=list(FOOLS))
def test_the_fast_path_cannot_be_fooled(text: bytes, tmp_path: Path) -> None:
    """Headers built to defeat the byte counts that let json.loads stand for the strict parse: each one is
    refused, as the strict parse (and, but for duplicates, safe_open) refuses it."""
    text = text.replace(b"ENTRY", b'{"dtype":"U8","shape":[4],"data_offsets":[0,4]}')
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))
    assert isinstance(our_reading(path), str), "accepted"
