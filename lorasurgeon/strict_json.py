"""Strict JSON: no duplicate keys, no lone surrogates, and (for safetensors headers) serde_json's grammar.

Python's json module is laxer than the safetensors library's parser (Rust's serde_json) in ways that matter
for a file format: it keeps the last of duplicate keys silently; it accepts lone UTF-16 surrogates
(`"\\ud800"`), which no UTF-8 writer can write back; it accepts NaN and Infinity, numbers too large for a
double (1e400 becomes inf) and nesting far deeper than serde_json's limit; and it reads `-0` as the integer 0
where serde_json reads a float. `loads` refuses all of these; with `serde=False` it keeps Python's number
grammar and depth (for the JSON files beside the weights, which Python tools write and read).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

# serde_json refuses a document nested 128 deep (arrays and objects together; the top-level object is 1).
MAX_DEPTH = 127
# Integers from here on may round to a double past the largest finite one, which serde_json refuses.
HUGE = 2**1023

Keys = tuple[str, ...]


class JsonRefusal(Exception):
    """Why `loads` refused a document: `reason` is a phrase; `keys` the object keys leading to the problem
    (empty at the top level) and `key` the offending key or string, when there is one."""

    def __init__(self, reason: str, keys: Keys = (), key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.keys = keys
        self.key = key


class _DuplicateFound(Exception):
    pass


class _Duplicated(dict[str, Any]):
    """An object that named a key twice, kept so that the walk can say where the object sits."""

    duplicate: str


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateFound
    return out


def _mark_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    marked = _Duplicated(out)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.duplicate = key
            break
        seen.add(key)
    return marked


def _serde_integer(text: str) -> int | float:
    """An integer token as serde_json reads it for our purposes: `-0` is a float, which no integer field
    accepts (a hook only used when the text holds a `-0`: it costs a call per integer)."""
    return -0.0 if text == "-0" else int(text)


def _serde_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JsonRefusal(f"number {text[:24]} is out of range")
    return value


def _no_constant(text: str) -> Any:
    raise JsonRefusal(f"{text} is not JSON")


def loads(text: str, *, serde: bool = True, skip: Callable[[Keys, Any], bool] | None = None) -> Any:
    """Parse `text`; raise JsonRefusal for invalid JSON, a duplicate key at any level, a lone surrogate in
    any key or string, and (with `serde`) anything serde_json refuses: NaN/Infinity, numbers out of a
    double's range, nesting deeper than MAX_DEPTH. Values for which `skip(keys, value)` holds are not
    searched for surrogates, depth or huge numbers: the caller validates every part of them itself."""
    hooks: dict[str, Any] = {}
    if serde:
        hooks = {"parse_float": _serde_float, "parse_constant": _no_constant}
        if "-0" in text:
            hooks["parse_int"] = _serde_integer
    try:
        doc = _parse(text, _refuse_duplicates, hooks)
    except _DuplicateFound:  # parse again, keeping the duplicates, to say where the first one is
        _walk(_parse(text, _mark_duplicates, hooks), serde, None)
        raise JsonRefusal("duplicate key") from None  # not reached: the walk meets the marked object
    _walk(doc, serde, skip)
    return doc


def _parse(text: str, pairs_hook: Callable[[list[tuple[str, Any]]], dict[str, Any]], hooks: dict[str, Any]) -> Any:
    try:
        return json.loads(text, object_pairs_hook=pairs_hook, **hooks)
    except json.JSONDecodeError as e:
        raise JsonRefusal(str(e)) from None
    except RecursionError:
        raise JsonRefusal("nested too deeply") from None
    except ValueError as e:  # an integer of more than 4,300 digits (Python's limit); serde_json refuses it too
        raise JsonRefusal(str(e).split(";")[0]) from None


def _walk(doc: Any, serde: bool, skip: Callable[[Keys, Any], bool] | None) -> None:
    """Check every object, string and number of `doc` without recursion (it may be nested ~1000 deep)."""
    stack: list[tuple[Any, Keys, int]] = [(doc, (), 1)]
    while stack:
        value, keys, depth = stack.pop()
        if isinstance(value, str):
            _check_string(value, keys)
        elif type(value) is int:
            if serde and not -HUGE < value < HUGE:
                _check_number(value, keys)
        elif isinstance(value, (dict, list)):
            if serde and depth > MAX_DEPTH:
                raise JsonRefusal(f"nested more than {MAX_DEPTH} deep", keys)
            if isinstance(value, _Duplicated):
                raise JsonRefusal("duplicate key", keys, value.duplicate)
            if isinstance(value, list):
                stack.extend((item, keys, depth + 1) for item in value)
            else:
                _push_items(value, keys, depth, skip, stack)


def _push_items(
    value: dict[str, Any],
    keys: Keys,
    depth: int,
    skip: Callable[[Keys, Any], bool] | None,
    stack: list[tuple[Any, Keys, int]],
) -> None:
    """The hot loop of a strict header parse: keys and string values checked in place, the rest stacked."""
    for key, item in value.items():
        if not key.isascii():
            _check_string(key, keys)
        if type(item) is str:
            if not item.isascii():
                _check_string(item, (*keys, key))
        elif isinstance(item, (dict, list)) or type(item) is int:
            inner = (*keys, key)
            if skip is None or not skip(inner, item):
                stack.append((item, inner, depth + 1))


def _check_string(text: str, keys: Keys) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRefusal("lone UTF-16 surrogate", keys, text) from None


def _check_number(value: int, keys: Keys) -> None:
    try:
        float(value)  # correctly rounded, as serde_json rounds the digits
    except OverflowError:
        raise JsonRefusal(f"number {str(value)[:24]}... is out of range", keys) from None
