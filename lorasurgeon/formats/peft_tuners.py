"""Reading a PEFT adapter whose peft_type is not LoRA (IA3, OFT, VeRA, ...) into the normal form.

Keys are PEFT's on-disk names (`save_and_load.py` `get_peft_model_state_dict`): `base_model.model.<module>.<role>`
for a module's own tensors (role from `peft_tuner_inventory.TUNERS`, any `.base_layer` segment of a nested
wrapper dropped from the module path), `base_model.<role>` (or `base_model.<role>.<name>`) for the adapter-wide
ones, and otherwise full tensors PEFT loads over the base's: `modules_to_save` modules, biases when the config's
`bias` is not "none", saved embeddings. Most tuners become `TunerModule`s; LN tuning's norms are `Replacement`s
and the trainable-tokens tuner's rows `TokenRows`, as in a LoRA adapter. Modules the config does not select are
kept apart, as PEFT leaves them out. Anything else is refused, naming the file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasurgeon.adapter import Adapter, Refused, Replacement, TokenRows, TunerModule
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import InputError, LorasurgeonError, Refusals, UnsupportedError
from lorasurgeon.formats.peft_config import ADAPTER_CONFIG, token_rows, under_module
from lorasurgeon.formats.peft_tuner_config import Site, TunerConfig, TunerKind
from lorasurgeon.formats.peft_tuner_inventory import TUNERS, refusal
from lorasurgeon.header import TensorInfo

PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
# The names of embedding modules whose full weight PEFT saves when the vocabulary was resized
# (utils/other.py EMBEDDING_LAYER_NAMES).
EMBEDDINGS = ("embed_tokens", "lm_head")
# Config fields of every tuner that change what is loaded in ways lorasurgeon does not reproduce.
REFUSED_FIELDS = {
    "layer_replication": "PEFT refuses to merge adapters on replicated layers",
    "target_parameters": "adapters on raw nn.Parameters (MoE experts) are not read for this tuner",
    "trainable_token_indices": "trainable tokens inside another tuner are not read for this tuner",
    "megatron_config": "Megatron-parallel layers are not read",
    "use_dora": "DoRA is not defined for this tuner",
    "alora_invocation_tokens": "aLoRA activates on invocation tokens at run time and cannot be merged",
}


def is_tuner_config(config: Mapping[str, Any]) -> bool:
    """Whether the config is a PEFT adapter's whose peft_type is anything but LoRA."""
    return isinstance(config.get("peft_type"), str) and config["peft_type"] != "LORA"


@dataclass
class _Contents:
    """What the file holds, sorted by role (mutable only while it is being read)."""

    modules: list[TunerModule] = field(default_factory=list)
    unselected: list[TunerModule] = field(default_factory=list)
    replacements: list[Replacement] = field(default_factory=list)
    rows: list[TokenRows] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


def read(path: Path, source: Checkpoint, config: Mapping[str, Any], config_path: Path, refusals: Refusals) -> Adapter:
    """The normal form of a non-LoRA PEFT adapter: its config dict (from `config_path`) and `source`'s headers.

    Through `refusals`: UnsupportedError for a tuner or a setting lorasurgeon does not merge exactly (naming
    why), MismatchError for a module whose tensors do not fit the config; InputError (always raised) for keys PEFT
    would not load. A refused tuner's tensors are described in `Adapter.refused`.
    """
    try:
        cfg = TunerConfig(config_path, config)
        kind = TUNERS.get(cfg.peft_type)
        if kind is None:
            raise UnsupportedError(f"{config_path}: peft_type {cfg.peft_type!r}: {refusal(cfg.peft_type)}")
        cfg.refuse_set(REFUSED_FIELDS)
    except UnsupportedError as e:
        refusals.add(e)
        peft_type = str(config["peft_type"])
        return Adapter(path, "peft", dict(config), (), source, refused=_described(source, peft_type), tuner=peft_type)
    shared, grouped, loose = _split(kind, source.tensors, source.path)
    found = _Contents()
    for module, roles in grouped.items():
        _add(found, cfg, kind, module, roles, shared, source.path, refusals)
    found.replacements += [_replacement(cfg, name, info, source.path) for name, info in loose.items()]
    return Adapter(
        path,
        "peft",
        dict(config),
        (),
        source,
        replacements=tuple(found.replacements),
        token_rows=tuple(found.rows),
        saved_modules=tuple(cfg.selection.modules_to_save),
        rank_source=ADAPTER_CONFIG,
        refused=tuple(found.refused),
        tuner=cfg.peft_type,
        tuner_modules=tuple(found.modules),
        tuner_unselected=tuple(found.unselected),
        shared=shared,
        selection=cfg.selection,
    )


def _add(
    found: _Contents,
    cfg: TunerConfig,
    kind: TunerKind,
    module: str,
    roles: dict[str, TensorInfo],
    shared: Mapping[str, TensorInfo],
    weights: Path,
    refusals: Refusals,
) -> None:
    """One module's tensors, as what `kind.form` says they are; a module PEFT would not load is refused."""
    if not cfg.selects(module):
        found.unselected.append(TunerModule(cfg.peft_type, module, roles))
        return
    try:
        if kind.form == "replacement":  # ln_tuning_layers.weight -> the norm's weight
            found.replacements += [Replacement(module, r.rpartition(".")[2], t) for r, t in roles.items()]
        elif kind.form == "rows":
            info = roles["trainable_tokens_delta"]
            indices = token_rows(cfg.field.token_indices("token_indices"), "token_indices", weights, module, info)
            found.rows.append(TokenRows(module, info, indices))
        else:
            found.modules.append(_module(cfg, kind, module, roles, shared, weights))
    except LorasurgeonError as e:
        refusals.add(e)
        found.refused.append(Refused(module, cfg.peft_type.lower(), dict(roles)))


def _module(
    cfg: TunerConfig,
    kind: TunerKind,
    module: str,
    roles: dict[str, TensorInfo],
    shared: Mapping[str, TensorInfo],
    weights: Path,
) -> TunerModule:
    if "randlora_A" in shared:  # each RandLoRA layer also saves the shared bases; the adapter-wide copy is used
        roles = {r: t for r, t in roles.items() if r not in ("randlora_A", "randlora_B")}
    site = Site(cfg, weights, module, {r: t.shape for r, t in roles.items()}, {r: t.shape for r, t in shared.items()})
    kind.check(site)
    parsed = kind.parse(site)
    fan_in_fan_out = cfg.flag("fan_in_fan_out", False)
    return TunerModule(cfg.peft_type, module, roles, parsed.params, parsed.writes, parsed.needs, fan_in_fan_out)


def _split(
    kind: TunerKind, tensors: Mapping[str, TensorInfo], weights: Path
) -> tuple[dict[str, TensorInfo], dict[str, dict[str, TensorInfo]], dict[str, TensorInfo]]:
    """(shared by role, module -> role -> tensor, the rest by key) of the file's tensors."""
    roles = sorted(kind.roles, key=len, reverse=True)  # vblora_logits_A_topk_indices before vblora_logits_A
    shared: dict[str, TensorInfo] = {}
    grouped: dict[str, dict[str, TensorInfo]] = {}
    loose: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name.startswith(PREFIX):
            rest = name.removeprefix(PREFIX)
            role = next((r for r in roles if rest.endswith(f".{r}")), None) or _numbered_role(kind, rest)
            if role is None:
                loose[name] = info
                continue
            grouped.setdefault(_unwrapped(rest[: -len(role) - 1]), {})[role] = info
        elif name.startswith(SHARED_PREFIX) and _shared_role(kind, name.removeprefix(SHARED_PREFIX)):
            shared[name.removeprefix(SHARED_PREFIX)] = info
        else:
            raise InputError(
                f"{weights}: tensor {name!r} is neither under {PREFIX!r} nor one of the adapter-wide tensors "
                f"{', '.join(kind.shared) or '(none)'} of this tuner"
            )
    return shared, grouped, loose


def _numbered_role(kind: TunerKind, rest: str) -> str | None:
    for pattern in kind.numbered:
        match = re.search(rf"\.({pattern})$", rest)
        if match:
            return match.group(1)
    return None


def _shared_role(kind: TunerKind, rest: str) -> bool:
    if kind.shared_named:
        return rest.split(".", 1)[0] in kind.shared and "." in rest
    return rest in kind.shared


def _unwrapped(path: str) -> str:
    """The module path with PEFT's `.base_layer` wrapper segments removed."""
    return re.sub(r"(^|\.)base_layer(?=\.|$)", "", path).lstrip(".")


def _replacement(cfg: TunerConfig, name: str, info: TensorInfo, weights: Path) -> Replacement:
    """A full tensor PEFT loads over the base's, or InputError when PEFT would not load `name` at all."""
    rest = name.removeprefix(PREFIX)
    wrapped = ".base_layer." in f".{rest}"
    module, _, param = _unwrapped(rest).rpartition(".")
    saved = (
        under_module(cfg.selection.modules_to_save, module)
        or (param == "bias" and cfg.raw("bias", "none") != "none")
        or (param == "weight" and (wrapped or module.rpartition(".")[2] in EMBEDDINGS))
    )
    if not saved:
        raise InputError(
            f"{weights}: tensor {name!r} is no {cfg.peft_type} tensor and no module the config saves in full "
            "(modules_to_save, bias, embeddings)"
        )
    return Replacement(module, param, info)


def _described(source: Checkpoint, peft_type: str) -> tuple[Refused, ...]:
    """A refused tuner's tensors grouped by module, for a lenient load to describe."""
    grouped: dict[str, dict[str, TensorInfo]] = {}
    for name, info in source.tensors.items():
        module, _, role = _unwrapped(name.removeprefix(PREFIX)).rpartition(".")
        grouped.setdefault(module or name, {})[role] = info
    return tuple(Refused(module, peft_type.lower(), tensors) for module, tensors in grouped.items())
