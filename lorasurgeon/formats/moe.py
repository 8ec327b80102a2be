"""MoE experts: the fused in-memory parameters of transformers 5, their tensors on disk, and PEFT's deltas on them.

transformers 5 holds a layer's routed experts as fused 3-D parameters of one `experts` module (`gate_up_proj`,
`down_proj`). The checkpoint may store them per expert (what `save_pretrained` writes for Mixtral and the
Qwen2-MoE family: conversion_mapping.py's `MergeModulelist(dim=0)` stacks the experts, `Concatenate(dim=1)` puts
gate before up) or fused as in memory (gpt-oss, which has no conversion; or any file saved from a model loaded
fused). PEFT's `target_parameters` adapts such a parameter with a `ParamWrapper` (peft/tuners/lora/layer.py):
`lora_A` (r·E, in) read as (E, r, in), expert-major rows; `lora_B` (out, r·E) read as (out, r, E), so expert e
owns columns e, e+E, e+2E, …; ΔW_e = s · B_e A_e with s from r (not r·E). "in"/"out" are PEFT's: a parameter
of an experts class without `is_transposed` is (E, out, in), one with it (gpt-oss) is (E, in, out).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from lorasurgeon.formats.transformers_names import checkpoint_names


@dataclass(frozen=True)
class ExpertLayout:
    """One experts class.

    `params`: its parameters in definition order (PEFT nests wrappers in this order, the first targeted
    innermost). `parts`: the per-expert pieces of each fused parameter in order along its out dim — the
    per-expert modules it is stored as on disk unless `stored_fused` (then the family's checkpoints hold the
    fused tensor, and the names only label the rows). `interleaved`: gate/up alternate row by row
    ([g0, u0, g1, u1, …]) instead of [gate | up]. `transposed`: PEFT's `is_transposed`. `experts_keys`: the
    config.json keys that may give the number of experts (the config's own name and its `attribute_map`
    aliases: Qwen3-MoE files of transformers 4 say `num_experts`, of 5 `num_local_experts`)."""

    family: str
    params: tuple[str, ...]
    parts: Mapping[str, tuple[str, ...]]
    interleaved: bool
    transposed: bool
    experts_keys: tuple[str, ...]
    stored_fused: bool = False


_QWEN2_MOE_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _qwen2_moe(*experts_keys: str) -> ExpertLayout:
    return ExpertLayout("qwen2_moe", ("gate_up_proj", "down_proj"), _QWEN2_MOE_PARTS, False, False, experts_keys)


# From each experts class in transformers 5.24 (`@use_experts_implementation` flags) and conversion_mapping.py.
LAYOUTS: Mapping[str, ExpertLayout] = {
    "mixtral": ExpertLayout(
        "mixtral",
        ("gate_up_proj", "down_proj"),
        {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
        False,
        False,
        ("num_local_experts", "num_experts"),
    ),
    "qwen2_moe": _qwen2_moe("num_experts"),
    "qwen3_moe": _qwen2_moe("num_local_experts", "num_experts"),
    "olmoe": _qwen2_moe("num_experts", "num_local_experts"),
    "deepseek_v3": _qwen2_moe("n_routed_experts", "num_local_experts"),  # its shared experts are plain Linear modules
    "gpt_oss": ExpertLayout(  # (E, H, 2I) with gate/up interleaved, stored fused: no conversion exists
        "gpt_oss",
        ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)},  # GptOssExperts._apply_gate: [..., ::2] is gate
        True,
        True,
        ("num_local_experts", "num_experts"),
        stored_fused=True,
    ),
}


@dataclass(frozen=True)
class ExpertSlice:
    """One checkpoint tensor a fused parameter's delta lands in, and which part of it.

    `expert` None: the tensor is the fused parameter itself and takes the whole delta (parameter layout).
    Otherwise it takes expert `expert`'s delta (out, in) rows `start:stop:step` (step 2: interleaved gate/up).
    `shape` is the shape the tensor must have."""

    tensor: str
    expert: int | None
    start: int
    stop: int
    step: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExpertTensors:
    """Where a fused parameter lives on disk: `layout` "fused" (one tensor) or "per-expert" (E · parts tensors,
    expert-major), or `problem`, a sentence saying why it cannot be placed."""

    slices: tuple[ExpertSlice, ...]
    layout: Literal["fused", "per-expert", "unknown"]
    problem: str | None = None


def layout_of(config: Mapping[str, object]) -> ExpertLayout | None:
    """The experts layout of a model from its config.json (None: no fused experts tabled for its model_type)."""
    model_type = config.get("model_type")
    return LAYOUTS.get(model_type) if isinstance(model_type, str) else None


# The parameters of every experts class transformers 5.24 ships (@use_experts_implementation), in the order each
# class defines those it has: PEFT nests its wrappers in this order, so it names the parameter of each nesting
# level without knowing the model (a test checks every experts class against it).
PARAMETER_ORDER = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
FUSED_MATRICES = ("gate_up_proj", "down_proj")  # the 3-D ones, (E, ·, ·) whatever E is


def nested_parameter(module: str, base_layers: int, target_parameters: Sequence[str]) -> tuple[str | None, str]:
    """(the parameter of `module` that an adapter key with `base_layers` `.base_layer` segments adapts, or None
    and why) for a PEFT `target_parameters` adapter, whatever the model: the targeted parameters of the module in
    PARAMETER_ORDER, the first innermost. A module with several targeted parameters outside that table is
    refused: the order PEFT nested them in depends on a class lorasurgeon does not know."""
    targeted = sorted(
        {t.rpartition(".")[2] for t in target_parameters if _names(module, t)},
        key=lambda p: PARAMETER_ORDER.index(p) if p in PARAMETER_ORDER else len(PARAMETER_ORDER),
    )
    if len(targeted) > 1 and not set(targeted) <= set(PARAMETER_ORDER):
        unknown = ", ".join(p for p in targeted if p not in PARAMETER_ORDER)
        return (
            None,
            f"{module} has several targeted parameters ({', '.join(targeted)}) and PEFT nests them in the "
            f"order its class defines them, which lorasurgeon does not know for {unknown}",
        )
    index = len(targeted) - 1 - base_layers
    if not 0 <= index < len(targeted):
        return (
            None,
            f"{module} has {base_layers} .base_layer levels but target_parameters names {len(targeted)} of "
            "its parameters",
        )
    return targeted[index], ""


def _names(module: str, target: str) -> bool:
    """PEFT's match of a target_parameters entry: the parameter's full path, or a dotted suffix of it. Without
    the model, a bare entry (`gate_up_proj`, as PEFT writes for all-linear) could name any module's parameter: an
    experts parameter is only looked for on a module named `experts` (transformers 5 names every experts module
    so), and another bare name only on other modules."""
    path, _, param = target.rpartition(".")
    experts = module.rpartition(".")[2] == "experts"
    if (param in PARAMETER_ORDER and not experts) or (experts and param not in PARAMETER_ORDER and not path):
        return False
    return f"{module}.{param}" == target or f"{module}.{param}".endswith(f".{target}")


def adapted_parameter(
    layout: ExpertLayout, module: str, base_layers: int, target_parameters: Sequence[str]
) -> str | None:
    """The parameter of the experts `module` that an adapter key with `base_layers` `.base_layer` segments adapts.

    PEFT (`_inject_parameters`) walks the module's own parameters in definition order and wraps each one that
    `target_parameters` names (the key, or a dotted suffix of it), each wrapper around the previous: the last
    targeted is outermost (`experts.lora_A`), the first innermost. None when that level adapts nothing."""
    targeted = [
        p
        for p in layout.params
        if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}") for t in target_parameters)
    ]
    index = len(targeted) - 1 - base_layers
    return targeted[index] if 0 <= index < len(targeted) else None


def fused_shape(layout: ExpertLayout, num_experts: int, out_features: int, in_features: int) -> tuple[int, int, int]:
    """The in-memory shape of a fused parameter whose adapter has `lora_B` (out, ·) and `lora_A` (·, in)."""
    if layout.transposed:
        return (num_experts, in_features, out_features)
    return (num_experts, out_features, in_features)


def part_rows(layout: ExpertLayout, param: str, out_features: int) -> tuple[tuple[str, int, int, int], ...]:
    """Each piece of a fused parameter's per-expert (out, in) delta: (part, start, stop, step) of its rows.
    Mixtral's gate_up_proj with I = 48: ("w1", 0, 48, 1), ("w3", 48, 96, 1); gpt-oss': ("gate", 0, 96, 2),
    ("up", 1, 96, 2)."""
    parts = layout.parts.get(param, (param,))
    rows = out_features // len(parts)
    if layout.interleaved:
        return tuple((part, k, out_features, len(parts)) for k, part in enumerate(parts))
    return tuple((part, k * rows, (k + 1) * rows, 1) for k, part in enumerate(parts))


def expert_slices(
    config: Mapping[str, object], fused_param: str, shape: tuple[int, int, int], tensor_names: Collection[str]
) -> ExpertTensors:
    """Where the checkpoint (`tensor_names`) stores the in-memory fused parameter `fused_param`
    (`model.layers.0.mlp.experts.gate_up_proj`) of in-memory `shape` (E, ·, ·), for the model of `config`.

    Per-expert names go through the model's transformers naming convention (Mixtral's `mlp` is
    `block_sparse_moe` on disk): Mixtral's gate_up_proj of expert 3 is `…block_sparse_moe.experts.3.w1.weight`
    (rows 0:I of ΔW_3) and `…experts.3.w3.weight` (rows I:2I)."""
    layout = layout_of(config)
    container, _, param = fused_param.rpartition(".")
    if layout is None or param not in layout.params:
        why = f"{fused_param}: no fused experts layout is known for model_type {config.get('model_type')!r}"
        return ExpertTensors((), "unknown", why)
    if fused_param in tensor_names:
        return ExpertTensors((ExpertSlice(fused_param, None, 0, 0, 1, shape),), "fused")
    if layout.stored_fused or param not in layout.parts:
        why = f"{fused_param} is stored fused in {layout.family} checkpoints, and this checkpoint does not hold it"
        return ExpertTensors((), "unknown", why)
    experts, out, inp = shape[0], *((shape[2], shape[1]) if layout.transposed else (shape[1], shape[2]))
    pieces = part_rows(layout, param, out)
    slices = []
    for expert in range(experts):
        for part, start, stop, step in pieces:
            found = checkpoint_names(config, f"{container}.{expert}.{part}.weight", tensor_names)
            if found.problem is not None:
                why = f"{fused_param} is neither fused nor per expert here: {found.problem}"
                return ExpertTensors((), "unknown", why)
            slices.append(ExpertSlice(found.names[0], expert, start, stop, step, (len(range(start, stop, step)), inp)))
    extra = checkpoint_names(config, f"{container}.{experts}.{pieces[0][0]}.weight", tensor_names)
    if extra.problem is None:
        return ExpertTensors((), "unknown", f"{fused_param}: the checkpoint holds more than {experts} experts")
    return ExpertTensors(tuple(slices), "per-expert")


def num_experts(config: Mapping[str, object]) -> int | None:
    """The number of routed experts per layer from config.json (its key depends on the model type)."""
    layout = layout_of(config)
    values = [config.get(key) for key in (layout.experts_keys if layout else ())]
    return next((v for v in values if isinstance(v, int)), None)


def stored_layout(tensor_names: Collection[str]) -> Literal["fused", "per-expert"] | None:
    """How a checkpoint stores MoE experts, from its names alone: "fused" (`…experts.gate_up_proj`, as transformers
    5 holds them), "per-expert" (`…experts.<n>.…`), None when it holds no experts module."""
    fused = {f".experts.{p}" for layout in LAYOUTS.values() for p in layout.params}
    if any(name.endswith(tuple(fused)) for name in tensor_names):
        return "fused"
    return "per-expert" if any(".experts.0." in name for name in tensor_names) else None


def is_fused_experts(tensor: str) -> bool:
    """Whether a tensor name is a fused experts parameter of a tabled layout (`…mlp.experts.gate_up_proj`)."""
    module, _, param = tensor.rpartition(".")
    return module.rpartition(".")[2] == "experts" and any(param in layout.params for layout in LAYOUTS.values())
