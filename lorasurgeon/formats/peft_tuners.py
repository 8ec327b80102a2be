"""Read a PEFT adapter whose peft_type is not LoRA (IA3, OFT, VeRA, ...) into a `tuner.TunerAdapter`.

Input: the adapter_config.json dict and the tensors of adapter_model.safetensors by name (headers only: no
tensor is read). Keys are PEFT's on-disk names (`save_and_load.py` `get_peft_model_state_dict`):
`base_model.model.<module>.<role>` for a module's own tensors (role from `peft_tuner_inventory.TUNERS`, any
`.base_layer` segment of a nested wrapper dropped from the module path), `base_model.<role>` (or
`base_model.<role>.<name>`) for the adapter-wide ones, and otherwise full tensors PEFT loads over the base's:
`modules_to_save` modules, biases when the config's `bias` is not "none", saved embeddings.
Modules the config does not select (`TunerConfig.selects`) are left out, as PEFT leaves them out; their keys
are listed in `ignored`. Anything else is refused, naming the file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorasurgeon.adapter import Replacement
from lorasurgeon.errors import InputError, UnsupportedError
from lorasurgeon.formats.peft_tuner_config import Shape, Site, TunerConfig, TunerKind
from lorasurgeon.formats.peft_tuner_inventory import TUNERS, refusal
from lorasurgeon.header import TensorInfo
from lorasurgeon.tuner import TunerAdapter, TunerModule

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


def read_tuner_adapter(
    config: Mapping[str, Any], tensors: Mapping[str, TensorInfo], *, config_path: Path, weights: Path
) -> TunerAdapter:
    """The TunerAdapter of a non-LoRA PEFT adapter from its config dict and its tensors' headers.

    `config_path` and `weights` name the files in messages. Raises UnsupportedError for a tuner or a setting
    lorasurgeon does not merge exactly (naming why), MismatchError for tensors that do not fit the config,
    InputError for keys PEFT would not load.
    """
    cfg = TunerConfig(config_path, config)
    kind = TUNERS.get(cfg.peft_type)
    if kind is None:
        raise UnsupportedError(f"{config_path}: peft_type {cfg.peft_type!r}: {refusal(cfg.peft_type)}")
    cfg.refuse_set(REFUSED_FIELDS)
    shared, grouped, loose = _split(kind, tensors, weights)
    modules: list[TunerModule] = []
    ignored: list[str] = []
    for module, roles in grouped.items():
        if not cfg.selects(module):
            ignored.extend(info.name for info in roles.values())
            continue
        modules.append(_module(cfg, kind, module, roles, shared, weights))
    replacements = [_replacement(cfg, name, info, weights) for name, info in loose.items()]
    return TunerAdapter(cfg.peft_type, config, tuple(modules), shared, tuple(replacements), tuple(ignored))


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
    shapes: dict[str, Shape] = {r: t.shape for r, t in roles.items()}
    site = Site(cfg, weights, module, shapes, {r: t.shape for r, t in shared.items()})
    kind.check(site)
    parsed = kind.parse(site)
    return TunerModule(cfg.peft_type, module, roles, parsed.params, parsed.writes, parsed.needs)


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
            module = _unwrapped(rest[: -len(role) - 1])
            grouped.setdefault(module, {})[role] = info
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
        any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in cfg.raw("modules_to_save", []))
        or (param == "bias" and cfg.raw("bias", "none") != "none")
        or (param == "weight" and (wrapped or module.rpartition(".")[2] in EMBEDDINGS))
    )
    if not saved:
        raise InputError(
            f"{weights}: tensor {name!r} is no {cfg.peft_type} tensor and no module the config saves in full "
            "(modules_to_save, bias, embeddings)"
        )
    return Replacement(module, param, info)
