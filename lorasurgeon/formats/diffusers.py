"""diffusers LoRA files: `<component>.<module path>.lora_A/lora_B.weight` keys with the components' LoraConfigs in the
`lora_adapter_metadata` metadata (shared FORMATS.md §5.6): detection, reading into the normal form, writing the
metadata.

The scale is each component's LoraConfig from `lora_adapter_metadata`, else `<module>.alpha` tensors, else 1
(alpha = rank), as diffusers loads it. diffusers ≥ 0.34 (PR #11324) builds the LoraConfig from the metadata, so
patterns, rsLoRA, DoRA and lora_bias load as written; diffusers < 0.34 and other readers of PEFT-keyed files ignore
it and use scale 1.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lorasurgeon.adapter import Adapter, LoraModule, Refused
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import InputError, LorasurgeonError, Refusals, UnsupportedError
from lorasurgeon.formats import kohya, peft
from lorasurgeon.formats.peft_config import LoraConfig
from lorasurgeon.header import TensorInfo

METADATA = "lora_adapter_metadata"
# Pipeline components whose prefix alone identifies the format; `transformer.` keys (SD3, Flux) look like a bare
# PEFT export of a GPT-2 and are only taken for diffusers with lora_adapter_metadata.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "prior")


def is_diffusers(names: Iterable[str], metadata: Mapping[str, str]) -> bool:
    """True for a diffusers LoRA file: PEFT keys under pipeline components, never under `base_model.model.`;
    `transformer.` components only with diffusers' own metadata."""
    names = list(names)
    components = {n.partition(".")[0] for n in names}
    if not components or any(n.startswith(peft.PEFT_PREFIX) for n in names):
        return False
    allowed = (*COMPONENTS, "transformer") if METADATA in metadata else COMPONENTS
    return components <= set(allowed)


def read(path: Path, source: Checkpoint, alpha: float | None, refusals: Refusals) -> Adapter:
    """A diffusers LoRA file; `alpha` overrides every scale. Module paths keep their component
    (`unet.down_blocks...`), which name resolution strips to find the tensor in a `unet/` checkpoint."""
    configs = _configs(source)
    alphas: dict[str, float] = {}
    parts: dict[str, dict[str, TensorInfo]] = {}
    refused: list[Refused] = []
    scalars = []
    for info in source:
        key = peft.split_key(info.name)
        if info.name.endswith(".alpha"):
            alphas[info.name.removesuffix(".alpha")] = kohya.scalar(source, info)
            scalars.append(info.name)
        elif key.role in ("replacement", "trainable_tokens_delta"):
            refusals.add(UnsupportedError(f"{source.path}: {info.name} is not a LoRA tensor of a diffusers file"))
            refused.append(Refused(key.module, "replacement", {key.param: info}))
        else:
            parts.setdefault(key.module, {})[key.role] = info
    modules = []
    for module, found in parts.items():
        try:
            modules.append(_module(source, module, found, configs, alphas, alpha, refusals))
        except LorasurgeonError as e:
            refusals.add(e)
            refused.append(Refused(module, "unpaired", dict(found)))
    source_name = f"its {METADATA}" if configs else "the command line"
    return Adapter(
        path, "diffusers", {}, tuple(modules), source, scalars=tuple(scalars), refused=tuple(refused),
        rank_source=source_name,
    )  # fmt: skip


def _module(
    source: Checkpoint,
    module: str,
    found: dict[str, TensorInfo],
    configs: Mapping[str, Mapping[str, Any]],
    alphas: Mapping[str, float],
    alpha: float | None,
    refusals: Refusals,
) -> LoraModule:
    a, b, kind = peft.factors(source.path, found)
    component, _, inner = module.partition(".")
    default = {"r": a.shape[0], "lora_alpha": alphas.get(module, a.shape[0])}
    default |= {"use_dora": "lora_magnitude_vector" in found, "lora_bias": "lora_B_bias" in found}
    settings = LoraConfig.parse(source.path, configs.get(component, default), alpha)
    one = peft.read_module(source.path, settings, inner, found, (a, b, kind), refusals)
    return dataclasses.replace(one, module=module, component=component)


def _configs(source: Checkpoint) -> dict[str, dict[str, Any]]:
    """`lora_adapter_metadata` (`{"unet.r": 4, "unet.lora_alpha": 8, ...}`) as one LoraConfig per component."""
    raw = source.shards[0].header.metadata.get(METADATA)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise InputError(f"{source.path}: metadata {METADATA} is not a JSON object")
    configs: dict[str, dict[str, Any]] = {}
    for name, value in doc.items():
        component, _, field = str(name).partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def packed(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """lora_adapter_metadata, unpacked: each component's adapter config with its keys prefixed (`unet.r`, ...)."""
    return {f"{component}.{k}": v for component, config in configs.items() for k, v in config.items()}


def metadata(packed_config: Mapping[str, Any]) -> str:
    """The lora_adapter_metadata string, sorted, as diffusers' own save_lora_weights writes it."""
    return json.dumps(packed_config, indent=2, sort_keys=True)
