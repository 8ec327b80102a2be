"""Tied weights (shared FORMATS.md §4.1): a tied checkpoint stores only the source of each tie (the input
embedding, T5's `shared`, BERT's `cls.predictions.bias`), and transformers ties the targets to it on load. Which
weights are tied, and under which names, is the architecture's: lorasurgeon.formats.model_classes, from
transformers' own `_tied_weights_keys`.

The policy, the same for every tied pair: the merged model computes what PEFT's forward computes with the adapter
loaded. There each tied weight gets only its own module's delta (a LoRA on the embedding does not change the head),
so when the adapter would give tied weights different values, the output stores the targets as tensors of their
own and sets tie_word_embeddings false (where the config honours it; T5's ties whatever it says, and transformers
then unties tensors stored apart with different values). Tied weights that get the same values stay tied: trainable
token rows, and a LoRA whose config ties it to the embedding's (PEFT's ensure_weight_tying). PEFT's own
merge_and_unload instead adds every delta to the one shared tensor, changing all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lorasurgeon.adapter import Adapter
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding
from lorasurgeon.formats.architectures import INPUT_EMBEDDINGS, tensor_candidates
from lorasurgeon.formats.model_classes import model_class, transformers_version
from lorasurgeon.header import TensorInfo

T = TypeVar("T")


@dataclass(frozen=True)
class Ties:
    """The tied weights of a base that its checkpoint does not store: each an `alias` (a TensorInfo of its source's
    bytes under the target's name), `sources` mapping each alias name to its source's name; `stored`: the tied
    pairs (target -> source) a checkpoint stores both of. `unknown` says why the ties cannot be known (None: they
    are known); `forced`: the config ties whatever tie_word_embeddings says."""

    aliases: tuple[TensorInfo, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)
    stored: Mapping[str, str] = field(default_factory=dict)
    unknown: str | None = None
    forced: bool = False


@dataclass(frozen=True)
class Untie:
    """What a merge into a tied base writes: the output config.json (None: the base's), the aliases to write as
    tensors of their own, and the finding that says so (an error when the ties cannot be known)."""

    config: dict[str, Any] | None = None
    aliases: tuple[TensorInfo, ...] = ()
    finding: Finding | None = None


def tied_weights(base: Checkpoint) -> Ties:
    """The base's ties, from config.json `architectures` (none without a config.json: a bare file names no model,
    and the one tensor it stores is what its loader ties)."""
    if base.config is None:
        return Ties()
    found = model_class(base.config)
    if found is None and base.config.get("tie_word_embeddings", True) is False:
        return Ties()
    if found is None:
        named = (base.config.get("architectures") or ["none"])[0]
        return Ties(unknown=f"its architecture ({named}, model type {base.config.get('model_type')})")
    if base.config.get("tie_word_embeddings", True) is False and not found.forced_tie:
        return Ties(forced=found.forced_tie)
    aliases, sources, both = [], {}, {}
    for target, source in found.tied.items():
        stored = next((c for c in tensor_candidates(*source.rsplit(".", 1)) if c in base.tensors), None)
        if stored is None:
            continue
        # a checkpoint without the base-model prefix (`wte.weight`) names the targets under it without it too
        prefix = source[: len(source) - len(stored)]
        name = target.removeprefix(prefix) if prefix and target.startswith(prefix) else target
        kept = next((c for c in (name, *tensor_candidates(*target.rsplit(".", 1))) if c in base.tensors), None)
        if kept is None:
            aliases.append(base.tensors[stored]._replace(name=name))
            sources[name] = stored
        else:  # stored twice (mergekit writes both): equal until the merge changes one
            both[kept] = stored
    return Ties(tuple(aliases), sources, both, forced=found.forced_tie)


def followers(adapter: Adapter, ties: Ties) -> set[str]:
    """The tensors of an adapter's unselected modules on tied weights that PEFT gives the embedding's LoRA instead
    (ensure_weight_tying saves the head's copy but leaves it out of target_modules): not ignored, but tied."""
    if not adapter.tied_lora:
        return set()
    tied = [m for m in adapter.unselected if any(c in ties.sources for c in tensor_candidates(m.module, "weight"))]
    return {t.name for m in tied for t in m.tensors}


def share(items: dict[str, list[T]], ties: Ties, keep: Callable[[T], bool]) -> None:
    """Give every alias the items of its source that `keep` says follow the tie (trainable-token rows, a LoRA tied
    to the embedding's), after its own."""
    for alias, source in ties.sources.items():
        shared = [item for item in items.get(source, []) if keep(item)]
        if shared:
            items.setdefault(alias, []).extend(shared)


def untie(base: Checkpoint, ties: Ties, gets: Callable[[str], object], changed: Callable[[str], bool]) -> Untie:
    """How a merge treats a tied base: `gets(name)` is what the merge does to a tensor (equal values: the same
    result), `changed(name)` whether it does anything."""
    if ties.unknown is not None:
        return _unknown(base, ties.unknown, changed)
    pairs = {**ties.sources, **ties.stored}
    diverging = sorted(t for t, source in pairs.items() if gets(t) != gets(source))
    written = tuple(a for a in ties.aliases if a.name in diverging) if ties.forced else ties.aliases
    config = None if ties.forced or base.config is None else {**base.config, "tie_word_embeddings": False}
    if not diverging or (config is None and not written):
        return Untie()
    touched = sorted({n for t in diverging for n in (t, pairs[t]) if changed(n)})
    stores = f"the output stores {', '.join(a.name for a in written)} as tensors of their own" if written else ""
    sets = "sets tie_word_embeddings to false in config.json" if config is not None else ""
    message = (
        f"{', '.join(sorted({pairs[t] for t in diverging}))}: the base ties {', '.join(diverging)} to it and the "
        f"adapter changes {' and '.join(touched)}; {' and '.join(filter(None, (stores, sets)))}, so each keeps the "
        "value PEFT's forward gives it (PEFT's merge_and_unload would change all of them)"
    )
    return Untie(config, written, Finding.of("warning", message, base_key=touched[0] if touched else None))


def _unknown(base: Checkpoint, why: str, changed: Callable[[str], bool]) -> Untie:
    """Refuse a change to an input embedding of a base whose tied weights cannot be known."""
    names = [n for n in base.tensors if changed(n) and n.rpartition(".")[0].rpartition(".")[2] in INPUT_EMBEDDINGS]
    if not names:
        return Untie()
    message = (
        f"{names[0]}: the adapter changes this embedding, and the base may tie an output head to it, but "
        f"{why} is not among the transformers {transformers_version()} classes lorasurgeon knows, so the head's "
        "name cannot be known and an untied head could not be written; if the checkpoint ties nothing to it, "
        f'say so with "tie_word_embeddings": false in {base.root / "config.json"}'
    )
    return Untie(finding=Finding.of("error", message, base_key=names[0]))
