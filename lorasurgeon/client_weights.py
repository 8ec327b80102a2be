"""`combine --weights FILE`: each adapter's weight from a JSON object or a CSV of path → weight (e.g. the clients'
sample counts of a federated round), matched to the adapters given on the command line.

A path in the file names an adapter when both resolve to the same file or directory, the file's paths taken
relative to the current directory, or else to the file's own directory. Every adapter needs exactly one entry
and every entry must name an adapter: a weight for a client that is not there is as wrong as a client without
one.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from lorasurgeon.errors import InputError, LorasurgeonError, Option


def read_weights(path: Path, adapters: Sequence[Path]) -> list[float]:
    """The weight of each of `adapters` from `path` (.json: {"clients/a": 120, ...}; otherwise CSV rows
    `path,weight`, an optional header row first). Raises InputError for an unreadable file or a weight that is no
    finite number, LorasurgeonError when entries and adapters do not match one to one."""
    entries = _entries(path)
    wanted = {_resolved(a, Path.cwd()): i for i, a in enumerate(adapters)}
    weights: list[float | None] = [None] * len(adapters)
    for name, weight in entries:
        index = wanted.get(_resolved(Path(name), Path.cwd()), wanted.get(_resolved(Path(name), path.parent)))
        if index is None:
            raise LorasurgeonError(
                f"{path}: {name} names none of the {len(adapters)} adapters given; ",
                Option("weights", path),
                " must hold exactly one weight per adapter",
            )
        if weights[index] is not None:
            raise LorasurgeonError(f"{path}: {name} has two weights ({weights[index]} and {weight})")
        weights[index] = weight
    missing = [str(a) for a, w in zip(adapters, weights, strict=True) if w is None]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LorasurgeonError(f"{path}: has no weight for {missing[0]}{more}")
    return [float(w) for w in weights if w is not None]


def _entries(path: Path) -> list[tuple[str, float]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the weights file: {e}") from None
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise InputError(f"{path}: is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise InputError(f"{path}: must hold one JSON object of adapter path -> weight")
        return [(str(k), _number(path, str(k), v)) for k, v in doc.items()]
    rows = [row for row in csv.reader(text.splitlines()) if row and any(cell.strip() for cell in row)]
    if rows and not _is_number(rows[0][-1]):
        rows = rows[1:]  # a header row (path,weight)
    bad = next((row for row in rows if len(row) != 2), None)
    if bad is not None:
        raise InputError(f"{path}: the row {','.join(bad)!r} is not `path,weight`")
    return [(row[0].strip(), _number(path, row[0].strip(), row[1].strip())) for row in rows]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(path: Path, name: str, value: object) -> float:
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if isinstance(value, str) and _is_number(value):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise InputError(f"{path}: the weight of {name} must be a finite number, not {value!r}")
    return number


def _resolved(path: Path, root: Path) -> Path:
    return (path if path.is_absolute() else root / path).resolve()
