"""adapter_config.json as lorasurgeon writes it, the one writer it has: each written module's rank and the alpha
that gives it its scale, long-standing keys only, rank/alpha patterns anchored to whole module paths, and a
target_modules that selects exactly what was written (shared FORMATS.md §6.4). Reading is peft_config's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WrittenModule:
    """One module of an adapter lorasurgeon writes: its path in the model, its rank and the alpha that gives
    it its scale (alpha / rank, or alpha / √rank under use_rslora)."""

    path: str
    rank: int
    alpha: float


def plain_alpha(rank: int, alpha: float, scale: float) -> float:
    """The alpha with which alpha / r is a module's scale: its own alpha unless it is rsLoRA (r > 1)."""
    return alpha if scale == alpha / rank else scale * rank


def written(paths: Sequence[str], modules: Sequence[tuple[int, float, float]]) -> tuple[bool, list[WrittenModule]]:
    """(use_rslora, modules) under which PEFT gives every module (rank, alpha, scale) its scale: the modules' own
    alphas when they agree on rsLoRA (exactly the scale they were read with), otherwise alpha = scale·r."""
    if all(scale == alpha / rank for rank, alpha, scale in modules):
        return False, [WrittenModule(p, r, a) for p, (r, a, _) in zip(paths, modules, strict=True)]
    if all(scale == alpha / math.sqrt(rank) for rank, alpha, scale in modules):
        return True, [WrittenModule(p, r, a) for p, (r, a, _) in zip(paths, modules, strict=True)]
    return False, [WrittenModule(p, r, plain_alpha(r, a, s)) for p, (r, a, s) in zip(paths, modules, strict=True)]


def adapter_config(
    modules: Sequence[WrittenModule],
    *,
    target_modules: list[str],
    use_rslora: bool = False,
    use_dora: bool = False,
    lora_bias: bool = False,
    fan_in_fan_out: bool = False,
    modules_to_save: list[str] | None = None,
    base_model: str | None = None,
    task_type: str | None = None,
    auto_mapping: dict[str, str] | None = None,
) -> dict[str, Any]:
    """adapter_config.json with long-standing keys only (FORMATS.md §6.4) that gives every module its rank and
    alpha: r and lora_alpha are the most common ones, the others `rank_pattern` / `alpha_pattern` entries keyed
    `^<module path>`, anchored so that a key never also matches a longer path ending in it (PEFT ≥ 0.15 and
    diffusers match keys this way; an unanchored full path fails on PEFT ≤ 0.14 just the same). `base_model` and
    `task_type` (or, without one, `auto_mapping`: the base's class and library) let AutoPeftModel build the base."""
    rank = Counter(m.rank for m in modules).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules).most_common(1)[0][0]
    config: dict[str, Any] = {
        "alpha_pattern": {f"^{m.path}": json_number(m.alpha) for m in modules if m.alpha != alpha},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": json_number(alpha),
        "lora_dropout": 0.0,
        "modules_to_save": modules_to_save or None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {f"^{m.path}": m.rank for m in modules if m.rank != rank},
        "target_modules": target_modules,
        "task_type": task_type,
        "use_dora": use_dora,
        "use_rslora": use_rslora,
    }
    if lora_bias:
        config["lora_bias"] = True  # a newer key (PEFT 0.14), written only when needed
    if task_type is None and auto_mapping is not None:
        config["auto_mapping"] = auto_mapping  # PEFT writes it for adapters without a task type
    return config


def target_modules_for(extracted: Sequence[str], paths: Sequence[str]) -> list[str]:
    """target_modules selecting exactly `extracted` among the model's module `paths`: short names (`q_proj`) where
    every module of that name was extracted, full paths otherwise (a targeted module without keys would warn at
    load)."""
    done = set(extracted)
    by_leaf: dict[str, set[str]] = {}
    for module in paths:
        by_leaf.setdefault(module.rpartition(".")[2], set()).add(module)
    out: list[str] = []
    for leaf in sorted({m.rpartition(".")[2] for m in done}):
        out.extend([leaf] if by_leaf.get(leaf, set()) <= done else sorted(by_leaf[leaf] & done))
    return out


def json_number(value: float) -> float | int:
    """A number as adapter_config.json writes it: an int when it is integral (8, not 8.0)."""
    return int(value) if float(value).is_integer() else value
