"""The predicates behind the runtime rules (runtimes.py): each yields (module path or None, what is wrong).

Pure functions of AdapterFacts and the server options; the rules table says which runtime applies which,
and where each was read.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lorasurgeon.adapter_facts import AdapterFacts, ModuleFacts

Options = Mapping[str, Any]
Violation = tuple[str | None, str]
Check = Callable[[AdapterFacts, Options], Iterator[Violation]]
Reading = Callable[[AdapterFacts, ModuleFacts, Options], float]

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
# init_lora_weights values vLLM accepts besides booleans (peft_helper.py _init_is_supported).
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
SCALE_RTOL = 1e-6  # readings computed in float64 from the same config agree far better than this


def peft_format(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    if facts.format != "peft":
        yield None, f"is a {facts.format}-format file, and only PEFT adapter directories are read"


def no_dora(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    yield from ((m.path, "has a DoRA magnitude vector (use_dora)") for m in facts.modules if m.dora)


def no_lora_bias(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    yield from ((m.path, "has a lora_B bias (lora_bias)") for m in facts.modules if m.bias)


def no_trainable_tokens(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    yield from ((path, "has trainable-token rows (trainable_token_indices)") for path in facts.trainable_tokens)


def no_full_tensors(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    yield from ((name, "is a full tensor that replaces the base's, not a LoRA factor") for name in facts.full_tensors)


def no_added_tokens(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    if facts.added_tokens:
        yield None, f"adds {facts.added_tokens} tokens past the base vocabulary"
    for m in facts.modules:
        if m.vocab is not None and facts.base_vocab is not None and m.vocab != facts.base_vocab:
            yield m.path, f"is an embedding LoRA over {m.vocab} rows, the base vocabulary has {facts.base_vocab}"


def no_embedding_modules(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    yield from ((m.path, f"is a LoRA on an {m.kind} layer") for m in facts.modules if m.kind != "linear")


def no_tied_lm_head(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    if facts.tied_embeddings:
        yield from ((m.path, "is a LoRA on lm_head, which the base ties to the input embedding") for m in _heads(facts))


def _heads(facts: AdapterFacts) -> list[ModuleFacts]:
    return [m for m in facts.modules if m.name == "lm_head"]


def applies_scale(reading: Reading, how: str) -> Check:
    """A check that every module gets PEFT's scale when the runtime computes it by `reading` (`how` says how)."""

    def check(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
        for m in facts.modules:
            applied = reading(facts, m, options)
            if not math.isclose(applied, m.scale, rel_tol=SCALE_RTOL):
                yield m.path, f"would get scale {applied:.6g} ({how}) where PEFT applies {m.scale:.6g}"

    return check


def tensor_rank_scale(facts: AdapterFacts, module: ModuleFacts, options: Options) -> float:
    """llama.cpp: adapter_scale·alpha/rank with rank = B's column count, or adapter_scale when alpha is 0."""
    return facts.lora_alpha / module.rank if facts.lora_alpha else 1.0


def global_scale(rslora: bool) -> Reading:
    """lora_alpha / r from the config for every module (/ √r under use_rslora when the runtime reads it)."""

    def reading(facts: AdapterFacts, module: ModuleFacts, options: Options) -> float:
        return facts.lora_alpha / (math.sqrt(facts.r) if rslora and facts.use_rslora else facts.r)

    return reading


def vllm_scale(facts: AdapterFacts, module: ModuleFacts, options: Options) -> float:
    """vLLM: PEFT's own scale where it reads rank_pattern / alpha_pattern, the global one before."""
    return module.scale if options["reads_patterns"] else global_scale(True)(facts, module, options)


def vllm_max_rank(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    limit = options["max_lora_rank"]
    if facts.r > limit:
        yield None, f"states r = {facts.r} in its config, above max_lora_rank {limit}: {_rank_advice(facts.r)}"
    for m in facts.modules:
        if m.rank > limit:
            yield m.path, f"has rank {m.rank}, above max_lora_rank {limit}: {_rank_advice(m.rank)}"


def _rank_advice(rank: int) -> str:
    fits = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if not fits:
        return f"vLLM allows at most {VLLM_MAX_LORA_RANKS[-1]}, so resize the adapter"
    return f"serve with --max-lora-rank {fits[0]} or resize the adapter"


def vllm_modules_to_save(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    refused = [name for name in facts.modules_to_save if name not in ("classifier", "score")]
    if refused:
        yield None, f"has modules_to_save {refused} (only classifier and score are served)"


def vllm_full_tensors(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    for name in facts.full_tensors:
        if name.rsplit(".", 2)[-2] not in ("classifier", "score"):
            yield name, "is a full tensor, which vLLM parses as an unsupported LoRA weight"


def vllm_init(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    init = facts.init_lora_weights
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        yield None, f"has init_lora_weights={init!r}, which changes the base weights when PEFT loads it"


def variant(field: str, what: str) -> Check:
    """A check that the config field `field` (one of AdapterFacts.variants) is not set."""

    def check(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
        if field in facts.variants:
            yield None, f"sets {field} ({what})"

    return check


def no_bias_tensors(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    if facts.bias != "none":
        yield None, f"has bias={facts.bias!r} (trained base biases)"


def sglang_max_rank(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    limit = options["max_lora_rank"]
    limit, source = (facts.r, "the config's r, which SGLang takes as max_lora_rank") if limit is None else (limit, "")
    for m in facts.modules:
        if m.rank > limit:
            yield m.path, f"has rank {m.rank}, above max_lora_rank {limit}{f' ({source})' if source else ''}"


def sglang_embeddings(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    if not options["embedding_lora"]:
        for m in facts.modules:
            if m.name in ("embed_tokens", "lm_head"):
                yield m.path, "is a LoRA on embed_tokens / lm_head, refused before SGLang's embedding LoRA"


def lora_type(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    if facts.peft_type.upper() != "LORA":
        yield None, f"has peft_type {facts.peft_type!r}, not LORA"


def sgmv_rank(rank: int, world_size: int) -> int:
    """The rank that LoRAX's / TGI's pad_rank pads to: 8·world_size at or below it, else the next multiple of 16."""
    floor = 8 * world_size
    return floor if rank <= floor else -(-rank // 16) * 16


def sgmv_padding(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    for m in facts.modules:
        padded = sgmv_rank(m.rank, options["world_size"])
        if padded != m.rank:
            yield (
                m.path,
                f"has rank {m.rank}, padded to {padded} at load; later layer types are then scaled by r={padded}",
            )


def uniform_rank(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    ranks: dict[str, set[int]] = defaultdict(set)
    for m in facts.modules:
        ranks[m.name].add(m.rank)
    for name, found in sorted(ranks.items()):
        if len(found) > 1:
            yield name, f"has ranks {sorted(found)} across layers; the layers of one type are stacked into one tensor"


def every_layer(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    if facts.num_layers is None:
        return
    layers: dict[str, set[int]] = defaultdict(set)
    for m in facts.modules:
        if m.layer is not None:
            layers[m.name].add(m.layer)
    for name, found in sorted(layers.items()):
        missing = sorted(set(range(facts.num_layers)) - found)
        if missing:
            yield name, f"is missing in layers {missing}, and then no layer of this type gets the adapter"


def scale_metadata(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    if facts.scale_metadata:
        return
    for m in facts.modules:
        if not math.isclose(m.scale, 1.0, rel_tol=SCALE_RTOL):
            yield m.path, f"has scale {m.scale:.6g}, but the file states no alphas, so diffusers applies 1"


# Config fields and the PEFT release that first reads them (FORMATS.md §1.2, checked against PEFT's tags).
PEFT_FIELDS = {
    "rank_pattern": (0, 6),
    "alpha_pattern": (0, 6),
    "use_rslora": (0, 8),
    "use_dora": (0, 9),
    "layer_replication": (0, 10),
    "lora_bias": (0, 14),
    "trainable_token_indices": (0, 15),
    "target_parameters": (0, 17),
}


def peft_fields(facts: AdapterFacts, options: Options) -> Iterator[Violation]:
    version = options["peft_version"]
    if version is None:
        return
    for name in sorted(facts.config_fields & PEFT_FIELDS.keys()):
        since = PEFT_FIELDS[name]
        if tuple(version) < since:
            yield None, f"sets {name}, which PEFT reads from {since[0]}.{since[1]} on (the loader is {version})"
