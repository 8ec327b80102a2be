"""A safetensors header's JSON text, read as the safetensors library reads it, quickly.

json.loads is the fast path. It can read a text differently from serde_json (the library's parser) only
through a duplicate key, a lone surrogate escape, `-0` or something serde_json refuses in a place our
validation never looks (an extra field of an entry); `_suspect_bytes` and `_keys_lost` notice each of these
with a few byte counts, and such a header is parsed by `strict_json` instead, which refuses what serde_json
refuses and every duplicate key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorasurgeon import strict_json
from lorasurgeon.errors import InputError

METADATA_KEY = "__metadata__"
ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


def load(path: Path, raw: bytes | bytearray) -> dict[str, Any]:
    """The header object of the file `path`; InputError naming the file and the key at fault."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a safetensors file (header is not UTF-8: {e})") from None
    key_colons = raw.count(b'":')
    suspect = _suspect_bytes(raw, key_colons)
    doc = _strict_json(path, text) if suspect else _fast_json(path, text)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: not a safetensors file (header is not a JSON object)")
    if not suspect and _keys_lost(key_colons, doc):
        strict: dict[str, Any] = _strict_json(path, text)  # a dict again: the same text
        return strict
    return doc


def _fast_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{path}: not a safetensors file (header JSON is nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4,300 digits
        raise InputError(f"{path}: not a safetensors file (header is not JSON: {e})") from None


def _suspect_bytes(raw: bytes | bytearray, key_colons: int) -> bool:
    """Whether the text may hold what json.loads reads differently from serde_json, or what the key count of
    `_keys_lost` cannot see: a colon not directly after a quote (a key's colon apart from it, or a colon in a
    string), a \\u escape (lone surrogates need one: UTF-8 decoding refuses encoded ones), or the number
    `-0`, which serde_json reads as a float. Three byte scans; real headers have none of these."""
    return raw.count(b":") != key_colons or b"\\u" in raw or _negative_zero(raw)


def _keys_lost(key_colons: int, doc: dict[str, Any]) -> bool:
    """Whether json.loads may have dropped a duplicate key, or an entry holds more than its three fields.

    Sound when `_suspect_bytes` is false. Every colon of the text then follows a quote directly, so every key
    (whose colon follows it, after no whitespace) ends one of the `key_colons` occurrences of `":`, which also
    count any `\\":` inside a string. A header that passes validation has at least top level + metadata + 3
    keys per entry; a count of exactly that means no object lost a duplicate key to json.loads and no entry
    holds anything but its three fields (nothing nested deeper than serde_json allows, no number it would
    refuse)."""
    meta = doc.get(METADATA_KEY)
    entries = len(doc) - (METADATA_KEY in doc)
    return key_colons != len(doc) + (len(meta) if isinstance(meta, dict) else 0) + 3 * entries


def _negative_zero(raw: bytes | bytearray) -> bool:
    """Whether `raw` may hold the number -0: a `-0` after `[`, `,` or `:` (and whitespace), where a JSON value
    starts. Dates in metadata ("2024-01-05") hold `-0` after a digit, and do not count."""
    at = raw.find(b"-0")
    while at >= 0:
        before = bytes(raw[max(0, at - 64) : at]).rstrip(b" \t\n\r")
        if not before or before[-1:] in (b"[", b",", b":"):
            return True
        at = raw.find(b"-0", at + 2)
    return False


def _strict_json(path: Path, text: str) -> Any:
    """The header read as safetensors reads it, refusing what it refuses and duplicate keys at any level."""
    try:
        return strict_json.loads(text, skip=_validated_entry)
    except strict_json.JsonRefusal as e:
        raise InputError(_refusal_message(path, e)) from None


def _validated_entry(keys: tuple[str, ...], value: Any) -> bool:
    """A tensor entry of exactly the three fields: header.py checks each of them, so the strict parse need not
    look inside (a name with a surrogate is a key of the top level, checked there)."""
    return len(keys) == 1 and keys[0] != METADATA_KEY and type(value) is dict and value.keys() == ENTRY_FIELDS


def _refusal_message(path: Path, e: strict_json.JsonRefusal) -> str:
    where = f"tensor {e.keys[0]!r}: header entry" if e.keys and e.keys[0] != METADATA_KEY else "header"
    if e.keys[:1] == (METADATA_KEY,):
        where = f"header {METADATA_KEY}"
    if e.reason == "duplicate key":
        if not e.keys:
            return f"{path}: header names {'tensor ' if e.key != METADATA_KEY else ''}{e.key!r} twice"
        return f"{path}: {where} names the key {e.key!r} twice"
    if e.reason == "lone UTF-16 surrogate":
        what = "tensor name" if not e.keys else f"{where} string"
        return (
            f"{path}: {what} {e.key!r} holds a lone UTF-16 surrogate, which is not Unicode text; no safetensors "
            "file can hold it, so lorasurgeon could not write it back"
        )
    return f"{path}: not a safetensors file (header is not JSON as the safetensors format defines it: {e.reason})"
