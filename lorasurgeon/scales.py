"""How each adapter format writes a module's scale (shared FORMATS.md §1.3, §5.3, §5.4, §5.6, §6.4), for convert.

A converted adapter keeps A and B byte for byte, so each format's own way of stating the scale must give every
module exactly the scale it had; nothing is folded into B:

- PEFT: adapter_config.json gives every module its rank and alpha. r and lora_alpha are the most common ones,
  the others `rank_pattern` / `alpha_pattern` entries keyed `^<module path>`: anchored, so a key never also
  matches a longer path ending in it (PEFT ≥ 0.15 and diffusers match keys this way; an unanchored full path
  fails on PEFT ≤ 0.14 just the same). use_rslora is kept when every module is rsLoRA, else alpha = scale·r.
- kohya: a float32 `N.alpha` = scale·r per module (rsLoRA and patterns included: kohya files have no rsLoRA
  flag, §5.3), and the minimum ss_* metadata (§5.4). Readers compute alpha / r, sd-scripts in float32; every
  merge (PEFT's, sd-scripts', lorasurgeon's) multiplies fp32 factors by the scale rounded to float32, so a
  float32 alpha loses nothing unless it changes that rounded scale, which needs scale·r to be no float32
  number and r no power of two: `float32_drift` says when.
- diffusers: each component's LoraConfig (the PEFT config above) in the `lora_adapter_metadata` metadata
  (`unet.r`, `unet.lora_alpha`, ...), as diffusers' own save_lora_weights writes it. diffusers ≥ 0.34 (PR
  #11324) builds the LoraConfig from it (loaders/peft.py `load_lora_adapter`, utils/peft_utils.py
  `_create_lora_config`), so patterns, rsLoRA, DoRA and lora_bias load as written. `.alpha` tensors are not
  written: diffusers' SD/SDXL loaders reject every key without "lora" in it ("Invalid LoRA checkpoint",
  `load_lora_weights`). diffusers < 0.34 and other readers of PEFT-keyed files ignore the metadata and use
  scale 1: convert to kohya for them, whose `.alpha` every reader honours.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lorasurgeon.adapter import LoraModule


def plain_alpha(module: LoraModule) -> float:
    """The alpha with which alpha / r is the module's scale: its own alpha unless it is rsLoRA (r > 1)."""
    return module.alpha if module.scale == module.alpha / module.rank else module.scale * module.rank


def peft_alphas(modules: Sequence[LoraModule]) -> tuple[bool, list[float]]:
    """(use_rslora, alphas) under which PEFT gives every module its scale: the modules' own alphas when they
    agree on rsLoRA (exactly the scale they were read with), otherwise alpha = scale·r."""
    if all(m.scale == m.alpha / m.rank for m in modules):
        return False, [m.alpha for m in modules]
    if all(m.scale == m.alpha / math.sqrt(m.rank) for m in modules):
        return True, [m.alpha for m in modules]
    return False, [plain_alpha(m) for m in modules]


def lora_config(paths: Sequence[str], modules: Sequence[LoraModule]) -> dict[str, Any]:
    """adapter_config.json with long-standing keys (FORMATS.md §6.4) that targets `paths` and gives each module
    its rank and scale: the most common rank and alpha, the others as `^path` pattern entries."""
    use_rslora, alphas = peft_alphas(modules)
    rank = Counter(m.rank for m in modules).most_common(1)[0][0]
    alpha = Counter(alphas).most_common(1)[0][0]
    config: dict[str, Any] = {
        "alpha_pattern": {f"^{p}": _number(a) for p, a in zip(paths, alphas, strict=True) if a != alpha},
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": _number(alpha),
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {f"^{p}": m.rank for p, m in zip(paths, modules, strict=True) if m.rank != rank},
        "target_modules": sorted(paths),
        "task_type": None,
        "use_dora": any(m.magnitude is not None for m in modules),
        "use_rslora": use_rslora,
    }
    if any(m.bias is not None for m in modules):
        config["lora_bias"] = True  # a newer key (PEFT 0.14), written only when needed
    return config


def diffusers_config(components: Mapping[str, tuple[Sequence[str], Sequence[LoraModule]]]) -> dict[str, Any]:
    """lora_adapter_metadata, unpacked: each component's LoraConfig with its keys prefixed (`unet.r`, ...)."""
    return {
        f"{component}.{field}": value
        for component, (paths, modules) in components.items()
        for field, value in lora_config(paths, modules).items()
    }


def kohya_alpha(module: LoraModule) -> float:
    """The float32 `.alpha` a kohya file stores for the module: scale·r, rounded to float32."""
    return _float32(plain_alpha(module))


def float32_drift(module: LoraModule, alpha: float) -> float | None:
    """The relative change of the scale when `alpha` / r replaces it, if that changes the float32 scale."""
    if _float32(alpha / module.rank) == _float32(module.scale):
        return None
    return abs(alpha / module.rank - module.scale) / abs(module.scale)


def kohya_metadata(modules: Sequence[LoraModule], alphas: Sequence[float], source: Mapping[str, str]) -> dict[str, str]:
    """sd-scripts' minimum metadata (FORMATS.md §5.4) over a kohya source's ss_* and modelspec.* entries (not its
    sshs_* hashes, which are of the old file's bytes)."""
    kept = {k: v for k, v in source.items() if k.startswith(("ss_", "modelspec."))}
    convs = [(m.rank, a) for m, a in zip(modules, alphas, strict=True) if m.kind == "conv"]
    args = {"conv_dim": _one([r for r, _ in convs]), "conv_alpha": _one([a for _, a in convs])} if convs else {}
    return kept | {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _one([m.rank for m in modules]),
        "ss_network_alpha": _one(alphas),
        "ss_network_args": json.dumps(args),
    }


def _one(values: Sequence[float]) -> str:
    """sd-scripts' metadata value: the one value all modules share, or "Dynamic"."""
    return str(values[0]) if len(set(values)) == 1 else "Dynamic"


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32).item())


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
