"""Adapters whose factors lorasurgeon computed (resize, combine): each module's name and keys in OUT's format, its
adapter_config.json or lora_adapter_metadata, kohya `.alpha` and ss_* metadata, and what a format cannot hold
(shared FORMATS.md §1.4, §5.1, §5.4, §5.6, §6.4).

Every module comes at scale 1 (B·A = ΔW). A kohya file states each module's scale by its own `.alpha` = r (exact
in float32). PEFT configs (adapter_config.json, and each diffusers component's LoraConfig) are written in the
single-alpha form that issue 16 makes the rule for every adapter lorasurgeon writes: one lora_alpha α (the most
common rank, so most modules keep B bit for bit), ranks as anchored rank_pattern entries where they differ, no
alpha_pattern, no rsLoRA, and B (with its lora_B bias) multiplied by cᵢ = rᵢ/α, so that every reader applying
α/rᵢ — PEFT, and llama.cpp's converter, which reads one lora_alpha — gives ΔW. (`single_alpha_form` is that rule
for scale-1 modules; formats.scale_form states it in general once issue 16 lands.)
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorasurgeon.adapter import Adapter, AdapterFormat, LoraModule
from lorasurgeon.errors import LorasurgeonError, UnsupportedError
from lorasurgeon.formats import diffusers, kohya, peft
from lorasurgeon.formats.limits import CANNOT
from lorasurgeon.formats.naming import target_names
from lorasurgeon.formats.peft_config_writer import WrittenModule, adapter_config
from lorasurgeon.formats.writing import FACTOR_KEYS

if TYPE_CHECKING:
    import torch

    from lorasurgeon.writer import CheckpointWriter


@dataclass(frozen=True)
class Computed:
    """One module of OUT: its name in OUT's format, the source module it stands for (its kind, Conv1D flag and
    component), its new rank, and whether it has a lora_B bias."""

    name: str
    module: LoraModule
    rank: int
    bias: bool = False


@dataclass(frozen=True)
class Layout:
    """How OUT states its modules: per module (A key, B key, bias key or None) and the cᵢ its B and bias are
    multiplied by; kohya's `.alpha` per module (else empty); the config written (adapter_config.json, or the
    unpacked lora_adapter_metadata); the safetensors metadata."""

    keys: tuple[tuple[str, str, str | None], ...]
    folds: tuple[float, ...]
    alphas: tuple[float, ...]
    config: dict[str, Any] | None
    metadata: dict[str, str]


def output_names(adapter: Adapter, modules: Sequence[LoraModule], to: AdapterFormat) -> list[str]:
    """Each module's name in the `to` format, as convert names it without BASE or a component (the same format:
    its own name). Refused, saying to convert first, where that needs BASE or a component."""
    try:
        return target_names(adapter, list(modules), to, None, None)
    except LorasurgeonError as e:
        raise UnsupportedError(
            *e.parts, f"; resize and combine take no BASE or component: convert {adapter.path} to {to} first"
        ) from None


def refusal(adapter: Adapter, module: LoraModule, to: AdapterFormat) -> UnsupportedError | None:
    """Why the `to` format cannot hold a computed version of `module` (a Conv1D or embedding LoRA outside PEFT,
    a lora_B bias in kohya), or None."""
    what = "conv1d" if module.fan_in_fan_out else "embedding" if module.kind == "embedding" else None
    if what is None and module.bias is not None and to == "kohya":
        what = "bias"
    if what is None or (to, what) not in CANNOT:
        return None
    return UnsupportedError(f"{adapter.path}: {module.a.name} {CANNOT[to, what]}; nothing was written")


def single_alpha_form(ranks: Sequence[int]) -> tuple[float, list[float]]:
    """(α, cᵢ) for modules at scale 1: α the most common rank, chosen as adapter_config's `r` is (ties: the first
    met), so that r = lora_alpha and peft.write_adapter folds nothing more; cᵢ = rᵢ/α."""
    alpha = float(Counter(ranks).most_common(1)[0][0]) if ranks else 1.0
    return alpha, [r / alpha for r in ranks]


def layout(source: Adapter, modules: Sequence[Computed], to: AdapterFormat, record: dict[str, Any]) -> Layout:
    """The keys, folds, config and metadata of OUT in `to`; `source` is the first input (its config and metadata
    are kept where they still hold), `record` our note of the operation."""
    metadata = {"format": "pt", "lorasurgeon": json.dumps(record)}
    if to == "kohya":
        alphas = tuple(float(c.rank) for c in modules)
        described = [dataclasses.replace(c.module, rank=c.rank) for c in modules]
        kept = source.source.shards[0].header.metadata if source.format == "kohya" else {}
        metadata = kohya.metadata(described, alphas, kept) | metadata
        return Layout(tuple(_keys(c, to) for c in modules), (1.0,) * len(modules), alphas, None, metadata)
    groups: dict[str, list[int]] = {}
    for index, c in enumerate(modules):
        groups.setdefault(c.name.partition(".")[0] if to == "diffusers" else "", []).append(index)
    folds = [1.0] * len(modules)
    configs = {}
    for group, members in groups.items():
        alpha, factors = single_alpha_form([modules[i].rank for i in members])
        for i, factor in zip(members, factors, strict=True):
            folds[i] = factor
        configs[group] = _peft_config(source, [modules[i] for i in members], alpha, to)
    config = configs[""] if to == "peft" else diffusers.packed(configs)
    if to == "diffusers":
        metadata[diffusers.METADATA] = diffusers.metadata(config)
    return Layout(tuple(_keys(c, to) for c in modules), tuple(folds), (), config, metadata)


def full_key(name: str) -> str:
    """The key of a tensor OUT holds in full (modules_to_save, saved embedding, token rows): a PEFT key."""
    return peft.PEFT_PREFIX + name.removeprefix(peft.PEFT_PREFIX)


def _keys(c: Computed, to: AdapterFormat) -> tuple[str, str, str | None]:
    a_key, b_key = FACTOR_KEYS["kohya" if to == "kohya" else "embedding" if c.module.kind == "embedding" else "linear"]
    prefix = peft.PEFT_PREFIX + c.name if to == "peft" else c.name
    return f"{prefix}.{a_key}", f"{prefix}.{b_key}", f"{prefix}.lora_B.bias" if c.bias else None


def _peft_config(source: Adapter, modules: list[Computed], alpha: float, to: AdapterFormat) -> dict[str, Any]:
    """One config in the single-alpha form: a PEFT source's own, restated, when OUT has exactly its modules;
    otherwise a new one targeting OUT's module paths (keeping the source's model, task and modules_to_save)."""
    paths = [c.name.partition(".")[2] if to == "diffusers" else c.name for c in modules]
    states = [WrittenModule(p, c.rank, alpha) for p, c in zip(paths, modules, strict=True)]
    fresh = adapter_config(
        states,
        target_modules=sorted(paths),
        lora_bias=any(c.bias for c in modules),
        fan_in_fan_out=any(c.module.fan_in_fan_out for c in modules),
        modules_to_save=list(source.saved_modules) if source.format == "peft" else None,
        base_model=source.config.get("base_model_name_or_path") if source.format == "peft" else None,
        task_type=source.config.get("task_type") if source.format == "peft" else None,
    )
    same = source.format == "peft" and sorted(m.module for m in source.modules) == sorted(paths)
    if not (same and source.config):
        return fresh
    keys = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias")
    restated = {**source.config, **{k: fresh[k] for k in keys if k in fresh}}
    restated.setdefault("lora_bias", False)
    return restated


def write(
    writer: CheckpointWriter,
    to: AdapterFormat,
    plan: Layout,
    tensors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    full: dict[str, torch.Tensor],
) -> None:
    """OUT through `writer`: per module (B, A, bias) at scale 1 (B and bias in fp64, multiplied by the module's cᵢ
    and rounded once to fp32), kohya's float32 alphas, and `full` tensors (modules_to_save, token rows) as they are.
    A PEFT directory goes through formats.peft.write_adapter, as extract's does."""
    import torch

    factors: dict[str, torch.Tensor] = {}
    for (a_key, b_key, bias_key), fold, (b, a, bias) in zip(plan.keys, plan.folds, tensors, strict=True):
        factors[a_key] = a.float()
        factors[b_key] = (b.double() * fold).float()
        if bias_key is not None and bias is not None:
            factors[bias_key] = (bias.double() * fold).float()
    if to == "peft" and plan.config is not None:
        record = json.loads(plan.metadata["lorasurgeon"])
        peft.write_adapter(writer, factors, plan.config, record, full, dict.fromkeys(factors, 1.0))  # scale 1
        return
    for (a_key, _, _), alpha in zip(plan.keys, plan.alphas, strict=True) if to == "kohya" else ():
        factors[a_key.removesuffix(".lora_down.weight") + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    entries = [(key, "F32", tuple(t.shape)) for key, t in factors.items()]
    with writer.shard(peft.ADAPTER_WEIGHTS, entries, plan.metadata) as stream:
        for tensor in factors.values():
            stream.write(tensor)
