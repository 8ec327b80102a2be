"""PEFT's `target_parameters` (peft/tuners/lora/layer.py ParamWrapper): LoRA on a module's raw parameters, as
PEFT >= 0.18 puts it on the fused experts of transformers-5 MoE models (and `all-linear` does on its own).

Each targeted parameter gets a wrapper; several on one module nest, the first (in the class' parameter order)
innermost, so the file holds `experts.base_layer.lora_A.weight` (gate_up_proj) beside `experts.lora_A.weight`
(down_proj). A 3-D parameter of E experts has lora_A (r·E, in) and lora_B (out, r·E); a 2-D one (a router's
`gate.weight`) is a plain (out, in) LoRA. Ranks and alphas come from rank_pattern / alpha_pattern matched against
the parameter's path (`…mlp.experts.gate_up_proj`), the key PEFT creates the wrapper with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path

from lorasurgeon.adapter import LoraModule
from lorasurgeon.errors import MismatchError, UnsupportedError
from lorasurgeon.formats.moe import FUSED_MATRICES, PARAMETER_ORDER, nested_parameter
from lorasurgeon.formats.peft_config import ADAPTER_CONFIG, LoraConfig

BASE_LAYER = "base_layer"


def depth_of(bare_key: str) -> int:
    """How many `.base_layer` levels a PEFT key has (a nested ParamWrapper's inner parameters)."""
    return bare_key.split(".").count(BASE_LAYER)


def wraps_parameters(settings: LoraConfig, module: str) -> bool:
    """Whether PEFT's `target_parameters` wraps `module`'s parameters: an entry names one of them (its path or a
    dotted suffix), and target_modules does not select the module itself (PEFT refuses both on one module)."""
    targets = settings.target_parameters
    return bool(targets) and not settings.selects(module) and nested_parameter(module, 0, targets)[0] is not None


def parameter_module(where: Path, settings: LoraConfig, lora: LoraModule, depth: int) -> LoraModule:
    """`lora` (read as a plain module) as the wrapper of one parameter at nesting `depth`: that parameter, its
    rank and alpha by the parameter's path, and for a fused parameter its number of experts (lora_A's rows / r).
    MismatchError when the factors do not split into whole experts; UnsupportedError for an unknown nesting."""
    parameter, problem = nested_parameter(lora.module, depth, settings.target_parameters)
    if parameter is None:
        raise UnsupportedError(f"{where}: {lora.a.name}: {problem}")
    rank, alpha = settings.rank_alpha(f"{lora.module}.{parameter}")
    rows, columns = lora.a.shape[0], lora.b.shape[1]
    if rows % rank or columns != rows:
        raise MismatchError(
            f"{where}: {lora.a.name} has {rows} rows and lora_B {columns} columns, which are not the same whole "
            f"number of experts at the rank {rank} {ADAPTER_CONFIG} gives {lora.module}.{parameter}"
        )
    scale = alpha / math.sqrt(rank) if settings.use_rslora else alpha / rank
    experts = rows // rank
    # A fused experts matrix (of any number of experts), or a 3-D parameter of several; else a 2-D parameter (a
    # router's weight, gpt-oss' (E, 2I) biases), which PEFT adapts as a plain (out, in) matrix.
    fused = parameter in FUSED_MATRICES or experts > 1
    return dataclasses.replace(
        lora,
        rank=rank,
        alpha=alpha,
        scale=scale,
        parameter=parameter,
        kind="experts" if fused else lora.kind,
        experts=experts if fused else 0,
    )


def nesting(modules: Iterable[LoraModule]) -> dict[tuple[str, str], int]:
    """(module, parameter) -> the `.base_layer` levels of its keys, for modules wrapping raw parameters: the
    parameters of one module in PARAMETER_ORDER, the last outermost (level 0), as PEFT nests them."""
    by_module: dict[str, list[str]] = {}
    for m in modules:
        if m.parameter != "weight" or m.experts:
            by_module.setdefault(m.module, []).append(m.parameter)
    depths = {}
    for module, parameters in by_module.items():
        ordered = sorted(parameters, key=lambda p: PARAMETER_ORDER.index(p) if p in PARAMETER_ORDER else -1)
        depths.update({(module, p): len(ordered) - 1 - i for i, p in enumerate(ordered)})
    return depths
