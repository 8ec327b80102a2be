"""adapter_config.json: typed reading of the fields PEFT's maths and module selection depend on, and PEFT's
selection rules (target_modules, exclude_modules, layers_to_transform, modules_to_save, rank/alpha patterns).

A field of the wrong type is an InputError naming the file and the field; a feature lorasurgeon cannot apply
exactly is an UnsupportedError naming it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasurgeon import keys
from lorasurgeon.errors import InputError, MismatchError, UnsupportedError
from lorasurgeon.header import TensorInfo

CONFIG_NAME = "adapter_config.json"

# Config fields whose non-default value means the adapter is not plain LoRA; each is refused by name.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "layer_replication": "layer replication (layer_replication), which PEFT cannot merge either",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which cannot be merged",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
}
# init_lora_weights values whose adapter only reproduces the fine-tune on top of a base that training rewrote
# (PiSSA/OLoRA/CorDA/LoRA-GA subtract s·B₀A₀ from W; LoftQ quantizes it).
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# (A role, B role, layer kind) of the two LoRA factor layouts; ConvNd is told from Linear by A's rank.


@dataclass(frozen=True)
class LoraConfig:
    """The adapter_config.json fields that decide which modules are adapted and how (FORMATS.md §1.3)."""

    rank: int
    alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    use_dora: bool
    lora_bias: bool
    rank_pattern: dict[str, float]
    alpha_pattern: dict[str, float]
    target_modules: str | list[str] | None
    exclude_modules: str | list[str] | None
    layers_to_transform: int | list[int] | None
    layers_pattern: str | list[str] | None
    modules_to_save: str | list[str] | None
    token_indices: list[int] | dict[str, list[int]] | None

    @classmethod
    def parse(cls, where: Path, config: Mapping[str, Any], alpha: float | None, refuse: bool = True) -> LoraConfig:
        """Read `config` (from the file `where`); `alpha` replaces lora_alpha and every alpha_pattern value.
        With `refuse`, an adapter lorasurgeon cannot merge exactly is an UnsupportedError (report describes
        such adapters, so it reads them with refuse=False)."""
        if refuse:
            refuse_unsupported(where, config)
        field = _FieldReader(where, config)
        rank = field.integer("r", 8)
        alpha_pattern = field.numbers("alpha_pattern")
        return cls(
            rank=rank,
            alpha=alpha if alpha is not None else field.number("lora_alpha", 8),
            use_rslora=field.boolean("use_rslora"),
            fan_in_fan_out=field.boolean("fan_in_fan_out"),
            use_dora=field.boolean("use_dora"),
            lora_bias=field.boolean("lora_bias"),
            rank_pattern=field.numbers("rank_pattern"),
            alpha_pattern={k: alpha for k in alpha_pattern} if alpha is not None else alpha_pattern,
            target_modules=field.names("target_modules"),
            exclude_modules=field.names("exclude_modules"),
            layers_to_transform=field.layers("layers_to_transform"),
            layers_pattern=field.names("layers_pattern"),
            modules_to_save=field.names("modules_to_save"),
            token_indices=field.token_indices("trainable_token_indices"),
        )

    def selects(self, module: str) -> bool:
        """PEFT's check_target_module_exists, for adapters that have a config."""
        saved = [self.modules_to_save] if isinstance(self.modules_to_save, str) else self.modules_to_save
        if keys.module_selected(self.exclude_modules, module) or keys.under_module(saved, module):
            return False
        if isinstance(self.target_modules, str) or self.target_modules is None:
            return keys.module_selected(self.target_modules, module)
        if module in self.target_modules:
            return True
        if not keys.module_selected(self.target_modules, module):
            return False
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return True
        index = keys.layer_index(module, self.layers_pattern)
        return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        rank = keys.pattern_value(self.rank_pattern, module)
        alpha = keys.pattern_value(self.alpha_pattern, module)
        return int(rank if rank is not None else self.rank), float(alpha if alpha is not None else self.alpha)

    def rows_for(self, where: Path, module: str, info: TensorInfo) -> tuple[int, ...]:
        """The token indices of `module`'s trainable_tokens_delta, as the config lists them (FORMATS.md §4.5)."""
        spec = self.token_indices
        if isinstance(spec, dict):
            found = [v for k, v in spec.items() if module == k or module.endswith("." + k)]
        else:
            found = [spec] if spec else []
        if not found:
            raise MismatchError(
                f"{where}: {info.name} holds trainable token rows but no {CONFIG_NAME} "
                f"trainable_token_indices entry names {module}"
            )
        if len(found[0]) != info.shape[0]:
            raise MismatchError(
                f"{where}: {info.name} holds {info.shape[0]} rows but trainable_token_indices lists {len(found[0])}"
            )
        return tuple(found[0])


def refuse_unsupported(where: Path, config: Mapping[str, Any]) -> None:
    """UnsupportedError naming every config field that makes the adapter more than LoRA we can merge."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedError(f"{where}: peft_type {peft_type!r} is not LoRA")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        raise UnsupportedError(
            f"{where}: init_lora_weights={init!r} trains the adapter against a modified base (the residual "
            "W - s·B₀A₀, or a quantized W), which this checkpoint is not; merging it here would be wrong. "
            "Save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA of the original base"
        )
    found = [label for name, label in UNSUPPORTED_FIELDS.items() if config.get(name) not in (None, False, [], {})]
    if isinstance(init, str) and init.lower().startswith("mica"):
        found.append(f"the MiCA variant (init_lora_weights={init!r})")
    if found:
        raise UnsupportedError(f"{where}: the adapter uses {', '.join(found)}, which lorasurgeon cannot merge yet")


class _FieldReader:
    """Typed access to config fields; a wrong type is an InputError naming the field."""

    def __init__(self, where: Path, config: Mapping[str, Any]) -> None:
        self.where = where
        self.config = config

    def _bad(self, name: str, expected: str) -> InputError:
        return InputError(f"{self.where}: field {name!r} must be {expected}, not {self.config[name]!r}")

    def integer(self, name: str, default: int) -> int:
        value = self.config.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self._bad(name, "a positive integer")
        return value

    def number(self, name: str, default: float) -> float:
        value = self.config.get(name, default)
        if not _is_number(value):
            raise self._bad(name, "a number")
        return float(value)

    def boolean(self, name: str) -> bool:
        value = self.config.get(name, False)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def numbers(self, name: str) -> dict[str, float]:
        value = self.config.get(name) or {}
        if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
            raise self._bad(name, "an object mapping module patterns to numbers")
        return {str(k): float(v) for k, v in value.items()}

    def names(self, name: str) -> str | list[str] | None:
        value = self.config.get(name)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise self._bad(name, "a string, a list of strings or null")

    def token_indices(self, name: str) -> list[int] | dict[str, list[int]] | None:
        value = self.config.get(name)
        if value is None or _is_ints(value):
            return value
        if isinstance(value, dict) and all(isinstance(k, str) and _is_ints(v) for k, v in value.items()):
            return {k: list(v) for k, v in value.items()}
        raise self._bad(name, "a list of token indices or an object mapping module names to such lists")

    def layers(self, name: str) -> int | list[int] | None:
        value = self.config.get(name)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return list(value)
        raise self._bad(name, "an integer, a list of integers or null")


def _is_ints(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
