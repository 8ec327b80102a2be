"""Naming tables: how adapter keys map to module paths and checkpoint tensor names, and PEFT's selection
rules (target_modules, exclude_modules, layers_to_transform, rank/alpha patterns) as PEFT applies them.

Everything here is a pure function of strings; see shared FORMATS.md §1.3-§1.5 for the rules' sources.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

PEFT_PREFIX = "base_model.model."

# The suffix of a PEFT adapter key -> (the role of the tensor, the parameter of the module it changes).
PEFT_ROLES: dict[str, tuple[str, str]] = {
    ".lora_A.weight": ("lora_A", "weight"),
    ".lora_B.weight": ("lora_B", "weight"),
    ".lora_B.bias": ("lora_B_bias", "bias"),
    ".lora_embedding_A": ("lora_embedding_A", "weight"),
    ".lora_embedding_B": ("lora_embedding_B", "weight"),
    ".lora_magnitude_vector": ("lora_magnitude_vector", "weight"),
    ".token_adapter.trainable_tokens_delta": ("trainable_tokens_delta", "weight"),
}

# transformers model types whose projections are `Conv1D` (weights stored (in, out)), and which modules are.
# Names alone do not decide it: GPT-Neo's c_fc/c_proj and GPT-BigCode's c_attn are nn.Linear.
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "decision_transformer": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
}


@dataclass(frozen=True)
class AdapterKey:
    """One PEFT adapter tensor key, split: the module path it belongs to and its role there."""

    key: str
    module: str
    role: str
    param: str


def split_peft_key(key: str) -> AdapterKey:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` -> module `model.layers.0.q_proj`, lora_A.

    Keys that are not LoRA factors are full replacement tensors (modules_to_save, saved embeddings,
    biases): their role is "replacement" and `param` is the tensor's last name component.
    """
    bare = key.removeprefix(PEFT_PREFIX)
    for suffix, (role, param) in PEFT_ROLES.items():
        if bare.endswith(suffix):
            return AdapterKey(key, _strip_base_layer(bare[: -len(suffix)]), role, param)
    module, _, param = bare.rpartition(".")
    return AdapterKey(key, _strip_base_layer(module), "replacement", param)


def _strip_base_layer(path: str) -> str:
    return ".".join(part for part in path.split(".") if part != "base_layer")


def tensor_candidates(module: str, param: str) -> list[str]:
    """Checkpoint names that may hold `module`'s `param`, most specific first.

    transformers loads checkpoints with or without the model's base prefix (original GPT-2 files store
    `h.0.attn.c_attn.weight` for the module `transformer.h.0.attn.c_attn`), so both forms are tried.
    """
    name = f"{module}.{param}"
    first, _, rest = name.partition(".")
    candidates = [name]
    if rest and first in {"transformer", "model", "base_model", "gpt_neox", "bert", "roberta"}:
        candidates.append(rest)
    return candidates


def is_conv1d(model_type: str | None, module: str) -> bool:
    """True when `module` of a `model_type` model is a transformers Conv1D (stored (in, out))."""
    return module.rpartition(".")[2] in CONV1D_MODULES.get(model_type or "", frozenset())


def module_selected(target: str | Sequence[str] | None, module: str) -> bool:
    """PEFT's target_modules / exclude_modules rule: list -> equal or dotted suffix; str -> fullmatch."""
    if target is None:
        return False
    if isinstance(target, str):
        return re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def layer_index(module: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The transformer layer index in `module`, found the way PEFT >= 0.20 finds it (the first match)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", module)
            if match:
                break
    return int(match.group(1)) if match else None


def pattern_value(patterns: Mapping[str, float], module: str) -> float | None:
    """The value of the first pattern key (in the file's order) that matches a dotted suffix of `module`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def shortest_unique_suffix(module: str, all_modules: Iterable[str]) -> str:
    """The shortest dotted suffix of `module` that is no other module's suffix (for pattern keys)."""
    others = [m for m in all_modules if m != module]
    parts = module.split(".")
    for i in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[i:])
        if not any(o == suffix or o.endswith("." + suffix) for o in others):
            return suffix
    return module
