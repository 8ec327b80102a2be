"""transformers-5 tensor names on disk versus in memory, as tables read from transformers' own source.

transformers 5 loads checkpoints through key conversions (`conversion_mapping.py`, applied by
`core_model_loading.py`): `WeightRenaming` rewrites names, `PrefixChange` adds or drops a leading component, and
`WeightConverter` fuses per-expert MoE tensors (those live in `moe.py`). `save_pretrained` reverts the conversions
the model was loaded through (`revert_weight_conversion`): a model loaded from a legacy file saves the legacy
names again, one loaded from a file already in the in-memory layout saves that layout, and one built from its
config saves the legacy names but without its `PrefixChange`s. PEFT adapters speak the in-memory names of the
version that trained them. So a name may be in either layout, and so may the checkpoint: `checkpoint_names`
tries both, and the tie table (`_tied_weights_keys`, honoured only with `tie_word_embeddings`) for tensors
`save_pretrained` never writes.

Tables are keyed like transformers' own lookup: the class in `config.json`'s `architectures` first, then
`model_type`. Only the families the tests check against the installed transformers (5.24) are here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Rename:
    """One of transformers' renamings as two dotted fragments: `disk` (checkpoint files) and `memory` (the model,
    and so a PEFT adapter trained on it). `start` fragments begin a name, `segment` ones sit anywhere between dots;
    `unless`: names beginning so are already in memory form (transformers' negative look-aheads)."""

    disk: str
    memory: str
    at: Literal["start", "segment"] = "segment"
    unless: tuple[str, ...] = ()


@dataclass(frozen=True)
class Convention:
    """How one architecture family's names differ between disk and memory.

    `renames` (WeightRenaming, in transformers' load order) hold for a whole file or not at all; each of
    `prefixes` (PrefixChange) may be absent on disk on its own (a model built from its config saves without it).
    `ties` maps an in-memory tensor to the tensor it is tied to when `tie_word_embeddings` (default `tie_default`).
    """

    family: str
    renames: tuple[Rename, ...] = ()
    prefixes: tuple[Rename, ...] = ()
    ties: tuple[tuple[str, str], ...] = ()
    tie_default: bool = False


@dataclass(frozen=True)
class Resolution:
    """The checkpoint tensors an in-memory tensor name is stored as (one, unless `problem` says why not), how
    (`convention`: "exact", "<family> legacy layout", ...), and `tied_to`, the in-memory tensor whose storage it
    shares when it is stored only through a tie (merging into it changes every tensor tied to it)."""

    names: tuple[str, ...]
    convention: str
    problem: str | None = None
    tied_to: str | None = None


_MIXTRAL = Convention("mixtral", renames=(Rename("block_sparse_moe", "mlp"),))  # conversion_mapping "mixtral"
_EXPERTS_ONLY = Convention("qwen2_moe")  # its WeightConverters fuse experts (moe.py) and rename nothing else
_LLAVA_ROOT = (  # conversion_mapping "llava", then "LlavaModel" scoped under `model.` (language_model.model -> ...)
    Rename("language_model.lm_head", "lm_head", "start"),
    Rename("language_model.model", "model.language_model", "start"),
    Rename("vision_tower", "model.vision_tower", "start"),
    Rename("multi_modal_projector", "model.multi_modal_projector", "start"),
)
# A CLIP / SigLIP vision tower drops its `vision_model.` ("CLIPVisionModel" PrefixChange, scoped to the tower).
_TOWER_PREFIX = (Rename("model.vision_tower.vision_model", "model.vision_tower", "start"),)
_LM_TIE = (("lm_head.weight", "model.language_model.embed_tokens.weight"),)

CONVENTIONS: Mapping[str, Convention] = {
    "mixtral": _MIXTRAL,
    "minimax": _MIXTRAL,
    **{t: _EXPERTS_ONLY for t in ("qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe")},
    "gpt_oss": Convention("gpt_oss"),  # no conversion: its checkpoints hold the fused in-memory layout
    "llava": Convention("llava", _LLAVA_ROOT, _TOWER_PREFIX, _LM_TIE),
    "gemma3": Convention("llava", _LLAVA_ROOT, _TOWER_PREFIX, _LM_TIE, tie_default=True),
    "Qwen2VLForConditionalGeneration": Convention(
        "Qwen2VLForConditionalGeneration",
        (
            Rename("visual", "model.visual", "start"),
            Rename("model", "model.language_model", "start", ("model.visual",)),
        ),
    ),
    "vit": Convention(  # "ViTModel", found on the ViT submodule of every ViT head
        "ViTModel",
        (
            Rename("encoder.layer", "layers"),
            Rename("attention.query", "q_proj"),
            Rename("attention.key", "k_proj"),
            Rename("attention.value", "v_proj"),
            Rename("attention.output.dense", "attention.o_proj"),
            Rename("intermediate.dense", "mlp.fc1"),
            Rename("output.dense", "mlp.fc2"),
        ),
    ),
    # The SD text encoder: transformers 5 holds it without `text_model.` (CLIPTextModelWithProjection keeps it).
    "CLIPTextModel": Convention("CLIPTextModel", prefixes=(Rename("text_model", "", "start"),)),
    "CLIPVisionModel": Convention("CLIPVisionModel", prefixes=(Rename("vision_model", "", "start"),)),
    "SiglipVisionModel": Convention("CLIPVisionModel", prefixes=(Rename("vision_model", "", "start"),)),
    "bart": Convention(
        "bart",
        ties=(
            ("model.encoder.embed_tokens.weight", "model.shared.weight"),
            ("model.decoder.embed_tokens.weight", "model.shared.weight"),
            ("lm_head.weight", "model.shared.weight"),
        ),
        tie_default=True,
    ),
    "whisper": Convention(
        "whisper", ties=(("proj_out.weight", "model.decoder.embed_tokens.weight"),), tie_default=True
    ),
}
_EXACT = Convention("exact")


def convention_of(config: Mapping[str, object]) -> Convention | None:
    """The naming convention of a model from its `config.json`: by architecture class first, then model_type
    (transformers' order); None when transformers (as tabled here) converts none of its names."""
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and architectures[0] in CONVENTIONS:
        return CONVENTIONS[architectures[0]]
    model_type = config.get("model_type")
    return CONVENTIONS.get(model_type) if isinstance(model_type, str) else None


def _replace(name: str, old: str, new: str, at: str) -> str | None:
    """`name` with the dot-bounded fragment `old` (its first occurrence; at the start for "start") replaced by
    `new`; None when `name` has no such fragment. An empty `old` at the start prepends `new`."""
    if at == "start":
        if old and name != old and not name.startswith(old + "."):
            return None
        return ".".join(part for part in (new, name[len(old) :].lstrip(".")) if part)
    padded = f".{name}."
    index = padded.find(f".{old}.")
    if index < 0:
        return None
    return (padded[: index + 1] + new + padded[index + 1 + len(old) :])[1:-1]


def _has(name: str, fragment: str, at: str) -> bool:
    return bool(fragment) and _replace(name, fragment, fragment, at) is not None


def to_memory(convention: Convention, name: str) -> str:
    """`name` as transformers holds it in memory, from either layout (a name already in memory form is kept):
    the renames in load order, then the prefix changes (transformers scopes those to a submodel, after)."""
    for rule in (*convention.renames, *convention.prefixes):
        extends = rule.memory.startswith(rule.disk + ".")  # e.g. model -> model.language_model: skip converted
        if (extends and _has(name, rule.memory, rule.at)) or any(_has(name, u, "start") for u in rule.unless):
            continue
        if rule.disk:
            name = _replace(name, rule.disk, rule.memory, rule.at) or name
    return name


def to_disk(convention: Convention, name: str) -> tuple[str, ...]:
    """The legacy on-disk forms of an in-memory `name`: with and without each prefix change reverted, then
    every rename reverted (transformers' save order)."""
    forms = [name]
    for rule in reversed(convention.prefixes):
        if rule.memory:
            forms += [f for f in (_replace(n, rule.memory, rule.disk, rule.at) for n in forms) if f is not None]
        else:  # the prefix is dropped in memory: put it back, unless it is there already
            forms += [f"{rule.disk}.{n}" for n in forms if not _has(n, rule.disk, "start")]
    legacy = []
    for form in forms:
        for rule in reversed(convention.renames):
            form = _replace(form, rule.memory, rule.disk, rule.at) or form
        legacy.append(form)
    return tuple(dict.fromkeys(legacy))


def _tie_source(convention: Convention, memory: str, config: Mapping[str, object]) -> str | None:
    tied = config.get("tie_word_embeddings", convention.tie_default)
    return dict(convention.ties).get(memory) if tied else None


def checkpoint_names(config: Mapping[str, object], name: str, tensor_names: Collection[str]) -> Resolution:
    """Where a checkpoint (`tensor_names`, its tensor names) stores the tensor an adapter calls `name`
    (`<module path>.weight`, in-memory or legacy form) for the model of `config` (its `config.json`).

    Tries the exact name, then both layouts of the model's transformers convention, then the tensor it is tied
    to. `problem` names the convention and every name tried when none, or more than one, is in the checkpoint.
    Example: Mixtral's `model.layers.0.mlp.gate.weight` -> `model.layers.0.block_sparse_moe.gate.weight`.
    A fused MoE expert parameter is not a tensor name here: see `moe.expert_slices`.
    """
    convention = convention_of(config) or _EXACT
    memory = to_memory(convention, name)
    tried = tuple(dict.fromkeys((name, memory, *to_disk(convention, memory))))
    found = tuple(n for n in tried if n in tensor_names)
    layout = "memory" if found[:1] == (memory,) else "legacy"
    how = "exact" if found[:1] == (name,) else f"{convention.family} {layout} layout"
    if len(found) > 1:
        return Resolution(found, how, f"{name} is ambiguous: {' and '.join(found)} are all in the checkpoint")
    if found:
        return Resolution(found, how)
    source = _tie_source(convention, memory, config)
    if source is not None:
        tied = checkpoint_names(config, source, tensor_names)
        if tied.problem is None:
            return Resolution(tied.names, f"{convention.family} tied weights", tied_to=source)
    if convention is _EXACT:
        kind = config.get("architectures") or config.get("model_type")
        return Resolution(
            (), "exact", f"{name} is not in the checkpoint (no transformers renaming is known for {kind})"
        )
    why = f"{name} is not in the checkpoint under any name of the {convention.family} convention"
    ties = f", nor is the {source} it is tied to" if source else ""
    return Resolution((), convention.family, f"{why} (tried {', '.join(tried)}){ties}")
