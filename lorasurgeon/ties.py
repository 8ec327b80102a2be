"""Tied weights (shared FORMATS.md §4.1): a tied checkpoint stores one tensor for several parameters, and
transformers re-ties them on load while `tie_word_embeddings` holds: lm_head to the input embedding, and the
ties transformers_names tables per family (BART's encoder and decoder embed_tokens and lm_head to
`model.shared`, Whisper's proj_out to the decoder's embed_tokens).

PEFT's adapter changes tied parameters separately (only trainable-token rows stay tied), so when it changes any
of them, the output stores every tied parameter as its own tensor and sets tie_word_embeddings false; otherwise
transformers would re-tie them on load and lose what the adapter did to one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding
from lorasurgeon.formats.architectures import OUTPUT_EMBEDDING, input_embedding
from lorasurgeon.formats.transformers_names import checkpoint_names, convention_of
from lorasurgeon.header import TensorInfo


@dataclass(frozen=True)
class Untie:
    """What a merge into a tied base writes: the output config.json (None: the base's), the aliases of stored
    bytes to write as tensors of their own (none: nothing is untied), the input embedding lm_head shares (whose
    trainable-token rows lm_head gets too), and the warning that says so."""

    config: dict[str, Any] | None = None
    aliases: tuple[TensorInfo, ...] = ()
    embedding: str | None = None
    finding: Finding | None = None


def tied_aliases(base: Checkpoint) -> tuple[TensorInfo, ...]:
    """Every tied parameter the base does not store, as an alias of the bytes it is tied to (lm_head.weight of
    the input embedding, BART's model.decoder.embed_tokens.weight of model.shared.weight, ...); none when
    nothing is tied."""
    config = base.config
    if config is None:
        return ()
    aliases: dict[str, TensorInfo] = {}
    embed = input_embedding(base.tensors)
    if config.get("tie_word_embeddings", True) and embed is not None and OUTPUT_EMBEDDING not in base.tensors:
        aliases[OUTPUT_EMBEDDING] = base.tensors[embed]._replace(name=OUTPUT_EMBEDDING)
    convention = convention_of(config)
    if convention is None or not config.get("tie_word_embeddings", convention.tie_default):
        return tuple(aliases.values())
    for member, source in convention.ties:
        stored = checkpoint_names(config, source, base.tensors)
        if member in aliases or stored.problem is not None or stored.tied_to is not None:
            continue
        if checkpoint_names({**config, "tie_word_embeddings": False}, member, base.tensors).problem is not None:
            aliases[member] = base.tensors[stored.names[0]]._replace(name=member)
    return tuple(aliases.values())


def untie(base: Checkpoint, aliases: tuple[TensorInfo, ...], changed: Callable[[str], bool]) -> Untie:
    """How a merge that changes the tensors `changed` says it changes treats a tied base."""
    if base.config is None or not aliases:
        return Untie()
    stored = {base.tensors[n].name for n in base.tensors for a in aliases if _same_bytes(base.tensors[n], a)}
    names = [n for n in (*sorted(stored), *(a.name for a in aliases)) if changed(n)]
    if not names:
        return Untie()
    message = (
        f"{' and '.join([*sorted(stored), *(a.name for a in aliases)])}: the base ties them and the adapter changes "
        f"{' and '.join(names)}; the output stores {' and '.join(a.name for a in aliases)} as tensors of their own "
        "and sets tie_word_embeddings to false in config.json, so each keeps the values the adapter gives it"
    )
    finding = Finding.of("warning", message, base_key=names[0])
    lm_head = next((a for a in aliases if a.name == OUTPUT_EMBEDDING), None)
    embed = input_embedding(base.tensors) if lm_head is not None else None
    return Untie({**base.config, "tie_word_embeddings": False}, aliases, embed, finding)


def _same_bytes(info: TensorInfo, alias: TensorInfo) -> bool:
    return (info.path, info.start) == (alias.path, alias.start)
