"""The files beside a merged checkpoint's weights, compared with the base's: config.json, generation_config.json and
the tokenizer files, for `verify`.

A merge copies them byte for byte, except config.json when it unties lm_head from the input embedding
(ties.py): then tie_word_embeddings must be false, or transformers re-ties lm_head to the embedding on load and
the merged head is lost, a known cause of merged models that repeat one token forever. JSON files are compared as
JSON, without the fields that only say which transformers wrote them; other files byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lorasurgeon.checkpoint import MODEL_CONFIG

FileKind = Literal["same", "changed", "missing", "extra"]
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Fields that say who wrote a config, not what the model is; transformers 5 writes `dtype` for `torch_dtype`.
UNCOMPARED = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})
RENAMED = {"torch_dtype": "dtype"}
TIE = "tie_word_embeddings"


@dataclass(frozen=True)
class FileVerdict:
    """One companion file of MERGED against the base's: `kind` and a sentence saying what differs."""

    name: str
    kind: FileKind
    detail: str = ""

    @property
    def proven(self) -> bool:
        return self.kind == "same"

    @property
    def message(self) -> str:
        return f"{self.name}: {self.kind}" + (f": {self.detail}" if self.detail else "")


def compare(base: Path, merged: Path, config: Mapping[str, Any] | None) -> list[FileVerdict]:
    """The companion files of two checkpoint directories; `config` is the config.json the merge writes (None:
    the base's, copied). Files neither holds are not listed; single-file checkpoints have none."""
    if not (base.is_dir() and merged.is_dir()):
        return []
    out = []
    for name in (MODEL_CONFIG, GENERATION_CONFIG, *TOKENIZER_FILES):
        ours, theirs = base / name, merged / name
        if not ours.is_file() and not theirs.is_file():
            continue
        if not theirs.is_file():
            out.append(FileVerdict(name, "missing", f"{base} has it, {merged} does not"))
        elif not ours.is_file():
            out.append(FileVerdict(name, "extra", f"{merged} has it, {base} does not"))
        elif name == MODEL_CONFIG:
            out.append(_config(theirs, config if config is not None else _json(ours), unties=config is not None))
        else:
            out.append(_file(ours, theirs))
    return out


def _config(path: Path, expected: Mapping[str, Any] | None, *, unties: bool) -> FileVerdict:
    found = _json(path)
    if expected is None or found is None:
        return _file_bytes(path.name, expected is None and found is None)
    differ = _differences(expected, found)
    if not differ:
        return FileVerdict(path.name, "same", f"{TIE} false, as the merge unties lm_head" if unties else "")
    if TIE in differ and unties:
        detail = (
            f"{TIE} is {json.dumps(found.get(TIE, True))} but the merge gives lm_head its own values: transformers "
            "re-ties lm_head to the input embedding on load and the merged head is lost"
        )
        return FileVerdict(path.name, "changed", detail)
    shown = ", ".join(f"{k}: {_short(expected.get(k))} -> {_short(found.get(k))}" for k in differ[:4])
    more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
    return FileVerdict(path.name, "changed", shown + more)


def _file(ours: Path, theirs: Path) -> FileVerdict:
    if ours.suffix == ".json":
        expected, found = _json(ours), _json(theirs)
        if expected is not None and found is not None:
            differ = _differences(expected, found)
            detail = ", ".join(differ[:4]) + (f" (and {len(differ) - 4} more)" if len(differ) > 4 else "")
            return FileVerdict(ours.name, "changed" if differ else "same", f"fields differ: {detail}" if differ else "")
    return _file_bytes(ours.name, ours.read_bytes() == theirs.read_bytes())


def _file_bytes(name: str, same: bool) -> FileVerdict:
    return FileVerdict(name, "same" if same else "changed", "" if same else "its bytes differ")


def _differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """The top-level fields whose values differ (a field one side lacks counts), sorted."""
    a, b = _normal(expected), _normal(found)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _ABSENT) != b.get(k, _ABSENT))


_ABSENT = object()


def _normal(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {RENAMED.get(k, k): v for k, v in doc.items() if k not in UNCOMPARED}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _short(value: Any) -> str:
    text = "absent" if value is None else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
