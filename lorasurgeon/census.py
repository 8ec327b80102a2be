"""Counting a checkpoint's or adapter's tensors from their headers: totals, per dtype, per category (norms,
embeddings, biases, matrices), per shard, and per module with identical numbered blocks collapsed into one row ×N.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.header import TensorInfo

# A name's category, first match wins: norms (with their biases), embeddings, other biases.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"norm|(^|\.)ln_?\w*\.")),
    ("embedding", re.compile(r"embed|(^|\.)(wte|wpe|lm_head)\.")),
    ("bias", re.compile(r"\.bias$")),
)
ANY_CATEGORY = re.compile("|".join(f"(?:{pattern.pattern})" for _, pattern in CATEGORIES))  # one search for most names
NUMEL = operator.attrgetter("numel")
BLOCK = re.compile(r"^(.*?\.)(\d+)\.(.+)$")  # the first numbered segment: a repeated block


@dataclass(frozen=True)
class Count:
    """Tensors, parameters and bytes of one slice of the input (a dtype, a category, a group, a shard)."""

    name: str
    tensors: int
    parameters: int
    bytes: int
    repeat: int = 1  # groups: how many identical blocks this row stands for (×N); totals are per block
    indices: str = ""  # groups: which block indices, e.g. "0-31"
    metadata: dict[str, str] = field(default_factory=dict)  # shards: the header's __metadata__


@dataclass(frozen=True)
class Census:
    totals: Count
    by_dtype: tuple[Count, ...]
    categories: tuple[Count, ...]
    shards: tuple[Count, ...]
    metadata: dict[str, str]


def census(ckpt: Checkpoint, infos: list[TensorInfo]) -> Census:
    """The counts of `infos` (tensors of `ckpt`) and of `ckpt`'s shards, with the metadata of every shard."""
    shards = tuple(
        Count(
            s.name,
            len(s.header.tensors),
            sum(map(NUMEL, s.header.tensors)),
            s.header.file_size,
            metadata=s.header.metadata,
        )
        for s in ckpt.shards
    )
    metadata = {k: v for s in reversed(ckpt.shards) for k, v in s.header.metadata.items()}
    # Block numbers never decide a category and one block's tensors share their dtypes, so summing per
    # (name with digits zeroed, dtype, matrix or not) first leaves a few dozen rows to categorise and add up
    # where a 100-shard checkpoint has ~20,000 tensors: one pass over them, not one per table.
    # (bytes.translate: str.translate is ten times slower, and this loop is most of a report's own time.)
    digits_to_zero = bytes.maketrans(b"123456789", b"000000000")
    sums: dict[tuple[bytes, str, bool], list[int]] = {}
    for t in infos:
        row = sums.setdefault((t.name.encode().translate(digits_to_zero), t.dtype, len(t.shape) >= 2), [0, 0, 0])
        row[0] += 1
        row[1] += t.numel
        row[2] += t.end - t.start
    order = {name: i for i, (name, _) in enumerate(CATEGORIES)}
    categories = _summed((_category(name.decode(), matrix), row) for (name, _, matrix), row in sums.items())
    categories = tuple(sorted(categories, key=lambda c: order.get(c.name, len(order))))
    by_dtype = _summed((dtype, row) for (_, dtype, _), row in sums.items())
    (totals,) = _summed(("total", row) for row in sums.values()) or (Count("total", 0, 0, 0),)
    return Census(totals, by_dtype, categories, shards, metadata)


def _counts(infos: Iterable[TensorInfo], key: Callable[[TensorInfo], str]) -> tuple[Count, ...]:
    return _summed((key(t), (1, t.numel, t.end - t.start)) for t in infos)


def _summed(rows: Iterable[tuple[str, Sequence[int]]]) -> tuple[Count, ...]:
    """(name, (tensors, parameters, bytes)) rows added up per name, sorted by name."""
    sums: dict[str, list[int]] = {}
    for name, (tensors, parameters, size) in rows:
        row = sums.setdefault(name, [0, 0, 0])
        row[0] += tensors
        row[1] += parameters
        row[2] += size
    return tuple(Count(name, tensors, parameters, size) for name, (tensors, parameters, size) in sorted(sums.items()))


def _category(name: str, matrix: bool) -> str:
    hit = ANY_CATEGORY.search(name) and next(category for category, pattern in CATEGORIES if pattern.search(name))
    return hit or ("matrix" if matrix else "other")


def groups(infos: list[TensorInfo]) -> tuple[Count, ...]:
    """Tensors grouped by module; numbered blocks with identical contents collapse into one row ×N."""
    blocks: dict[tuple[str, str], list[TensorInfo]] = {}  # (prefix, index) -> its tensors
    singles = []
    for t in infos:
        match = BLOCK.match(t.name)
        if match:
            blocks.setdefault((match[1], match[2]), []).append(t)
        else:
            singles.append(t)
    rows = [replace(c, name=c.name or "(top level)") for c in _counts(singles, lambda t: t.name.rpartition(".")[0])]
    alike: dict[tuple[str, tuple[tuple[str, str, tuple[int, ...]], ...]], list[str]] = {}
    for (prefix, index), members in blocks.items():
        start = len(prefix) + len(index) + 1
        signature = tuple(sorted((t.name[start:], t.dtype, t.shape) for t in members))
        alike.setdefault((prefix, signature), []).append(index)
    for (prefix, _), indices in alike.items():
        (block,) = _counts(blocks[(prefix, indices[0])], lambda t: "block")
        rows.append(replace(block, name=f"{prefix}*", repeat=len(indices), indices=_ranges(sorted(map(int, indices)))))
    return tuple(sorted(rows, key=lambda c: (c.name, c.indices)))


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def per_layer(modules: Iterable[tuple[str, int]]) -> dict[str, int]:
    """LoRA parameters per numbered block (layer) from (module path, parameters) pairs: the first numbered path
    segment is the layer (`model.layers.3.mlp.experts` -> "3"); modules outside any block are left out."""
    layers: dict[str, int] = {}
    for module, parameters in modules:
        match = BLOCK.match(f"{module}.")
        if match:
            layers[match.group(2)] = layers.get(match.group(2), 0) + parameters
    return dict(sorted(layers.items(), key=lambda item: int(item[0])))
