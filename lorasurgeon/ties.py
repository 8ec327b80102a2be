"""Tied input and output embeddings (shared FORMATS.md §4.1): a tied checkpoint stores only the input embedding,
and transformers re-ties lm_head to it on load.

PEFT's adapter changes the input and output embeddings separately (only trainable-token rows stay tied), so
when it changes either, the output stores both and sets tie_word_embeddings false; otherwise transformers would
re-tie them on load and lose one of the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding
from lorasurgeon.formats.architectures import OUTPUT_EMBEDDING, input_embedding
from lorasurgeon.header import TensorInfo


@dataclass(frozen=True)
class Untie:
    """What a merge into a tied base writes: the output config.json (None: the base's), the lm_head alias of the
    embedding's bytes to write as its own tensor (None: none), and the warning that says so."""

    config: dict[str, Any] | None = None
    alias: TensorInfo | None = None
    embedding: str | None = None
    finding: Finding | None = None


def tied_alias(base: Checkpoint) -> TensorInfo | None:
    """lm_head.weight as an alias of the input embedding's bytes, when the base ties them and stores only the
    embedding (transformers' default for tied models); None when lm_head is stored or nothing is tied."""
    if base.config is None or not base.config.get("tie_word_embeddings", True):
        return None
    embed = input_embedding(base.tensors)
    if embed is None or OUTPUT_EMBEDDING in base.tensors:
        return None
    return base.tensors[embed]._replace(name=OUTPUT_EMBEDDING)


def untie(base: Checkpoint, alias: TensorInfo | None, changed: Callable[[str], bool]) -> Untie:
    """How a merge that changes the tensors `changed` says it changes treats a tied base."""
    if base.config is None or not base.config.get("tie_word_embeddings", True):
        return Untie()
    embed = input_embedding(base.tensors)
    if embed is None:
        return Untie()
    names = [n for n in (embed, OUTPUT_EMBEDDING) if changed(n)]
    if not names:
        return Untie()
    message = (
        f"{embed} and {OUTPUT_EMBEDDING}: the base ties them and the adapter changes {' and '.join(names)}; "
        f"the output stores {OUTPUT_EMBEDDING} as its own tensor and sets tie_word_embeddings to false "
        "in config.json, so both keep the values the adapter gives them"
    )
    finding = Finding.of("warning", message, base_key=names[0])
    return Untie({**base.config, "tie_word_embeddings": False}, alias, embed, finding)
