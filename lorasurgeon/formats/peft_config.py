"""adapter_config.json: typed reading of the fields PEFT's maths and module selection depend on, and PEFT's
selection rules (target_modules, exclude_modules, layers_to_transform, modules_to_save, rank/alpha patterns)
(shared FORMATS.md §1.3); the one writer of adapter_config.json lorasurgeon has is formats.peft_config_writer.

A field of the wrong type is an InputError naming the file and the field; a feature lorasurgeon cannot apply
exactly is an UnsupportedError naming it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasurgeon.errors import MismatchError, UnsupportedError
from lorasurgeon.formats.config_fields import FieldReader
from lorasurgeon.header import TensorInfo

ADAPTER_CONFIG = "adapter_config.json"

# Config fields whose non-default value means the adapter is not plain LoRA; each is refused by name, with what
# keeps it from being merged (by default: lorasurgeon does not merge it yet).
YET = "which lorasurgeon cannot merge yet"
UNSUPPORTED_FIELDS: dict[str, tuple[str, str]] = {
    "layer_replication": ("layer replication (layer_replication)", "which PEFT cannot merge either"),
    "alora_invocation_tokens": ("activated LoRA (alora_invocation_tokens)", "which cannot be merged at all"),
    "velora_config": ("VeLoRA (velora_config)", YET),
    "kasa_config": ("KaSA (kasa_config)", YET),
    "use_bdlora": ("BD-LoRA (use_bdlora)", YET),
    "arrow_config": ("Arrow routing (arrow_config)", YET),
    "monteclora_config": ("MonteCLoRA (monteclora_config)", YET),
    "use_qalora": ("QA-LoRA (use_qalora)", YET),
}
# init_lora_weights values whose adapter only reproduces the fine-tune on top of a base that training rewrote
# (PiSSA/OLoRA/CorDA/LoRA-GA subtract s·B₀A₀ from W; LoftQ quantizes it).
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


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
    selection: Selection
    token_indices: list[int] | dict[str, list[int]] | None
    target_parameters: list[str] = dataclasses.field(default_factory=list)
    ensure_weight_tying: bool = False

    @property
    def modules_to_save(self) -> list[str]:
        return self.selection.modules_to_save

    @classmethod
    def parse(cls, where: Path, config: Mapping[str, Any], alpha: float | None) -> LoraConfig:
        """Read `config` (from the file `where`); `alpha` replaces lora_alpha and every alpha_pattern value.
        Fields are checked for type only: what lorasurgeon cannot merge is `refusal`'s to say."""
        field = FieldReader(where, config)
        alpha_pattern = field.patterns("alpha_pattern", positive_integers=False)
        return cls(
            rank=field.integer("r", 8),
            alpha=alpha if alpha is not None else field.number("lora_alpha", 8),
            use_rslora=field.boolean("use_rslora"),
            fan_in_fan_out=field.boolean("fan_in_fan_out"),
            use_dora=field.boolean("use_dora"),
            lora_bias=field.boolean("lora_bias"),
            rank_pattern=field.patterns("rank_pattern", positive_integers=True),
            alpha_pattern={k: alpha for k in alpha_pattern} if alpha is not None else alpha_pattern,
            selection=Selection.parse(field),
            token_indices=field.token_indices("trainable_token_indices"),
            ensure_weight_tying=field.boolean("ensure_weight_tying"),
            target_parameters=_listed(field.names("target_parameters")),
        )

    def selects(self, module: str) -> bool:
        return self.selection.selects(module)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        rank = pattern_value(self.rank_pattern, module)
        alpha = pattern_value(self.alpha_pattern, module)
        return int(rank if rank is not None else self.rank), float(alpha if alpha is not None else self.alpha)

    def rows_for(self, where: Path, module: str, info: TensorInfo) -> tuple[int, ...]:
        """The token indices of `module`'s trainable_tokens_delta, as the config lists them (FORMATS.md §4.5)."""
        return token_rows(self.token_indices, "trainable_token_indices", where, module, info)


def token_rows(
    spec: list[int] | dict[str, list[int]] | None, name: str, where: Path, module: str, info: TensorInfo
) -> tuple[int, ...]:
    """The rows `info` (a trainable_tokens_delta of `module`) sets, as the config field `name` lists them: one list
    for every module, or lists by module name (FORMATS.md §4.5)."""
    if isinstance(spec, dict):
        found = [v for k, v in spec.items() if module == k or module.endswith("." + k)]
    else:
        found = [spec] if spec else []
    if not found:
        raise MismatchError(
            f"{where}: {info.name} holds trainable token rows but no {ADAPTER_CONFIG} {name} entry names {module}"
        )
    if len(found[0]) != info.shape[0]:
        raise MismatchError(f"{where}: {info.name} holds {info.shape[0]} rows but {name} lists {len(found[0])}")
    return tuple(found[0])


@dataclass(frozen=True)
class Selection:
    """The config fields that select the modules PEFT adapts, of every tuner alike."""

    target_modules: str | list[str] | None
    exclude_modules: str | list[str] | None
    layers_to_transform: int | list[int] | None
    layers_pattern: str | list[str] | None
    modules_to_save: list[str]

    @classmethod
    def parse(cls, field: FieldReader) -> Selection:
        saved = field.names("modules_to_save")
        return cls(
            target_modules=field.regex_or_names("target_modules"),
            exclude_modules=field.regex_or_names("exclude_modules"),
            layers_to_transform=field.layers("layers_to_transform"),
            layers_pattern=field.names("layers_pattern"),
            modules_to_save=[saved] if isinstance(saved, str) else list(saved or ()),
        )

    def selects(self, module: str) -> bool:
        """PEFT's check_target_module_exists, for adapters that have a config."""
        if module_selected(self.exclude_modules, module) or under_module(self.modules_to_save, module):
            return False
        if isinstance(self.target_modules, str) or self.target_modules is None:
            return module_selected(self.target_modules, module)
        if module in self.target_modules:
            return True
        if not module_selected(self.target_modules, module):
            return False
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return True
        index = layer_index(module, self.layers_pattern)
        return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def _listed(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or ())


def refusal(where: Path, config: Mapping[str, Any]) -> UnsupportedError | None:
    """The UnsupportedError naming every config field that makes the adapter more than LoRA we can merge."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        return UnsupportedError(f"{where}: peft_type {peft_type!r} is not LoRA")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        return UnsupportedError(
            f"{where}: init_lora_weights={init!r} trains the adapter against a modified base (the residual "
            "W - s·B₀A₀, or a quantized W), which this checkpoint is not; merging it here would be wrong. "
            "Save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA of the original base"
        )
    found = [label for name, label in UNSUPPORTED_FIELDS.items() if config.get(name) not in (None, False, [], {})]
    if isinstance(init, str) and init.lower().startswith("mica"):
        found.append((f"the MiCA variant (init_lora_weights={init!r})", YET))
    if not found:
        return None
    reasons: dict[str, list[str]] = {}  # each reason once, after everything it is the reason for
    for label, reason in found:
        reasons.setdefault(reason, []).append(label)
    said = "; and ".join(f"{' and '.join(labels)}, {reason}" for reason, labels in reasons.items())
    return UnsupportedError(f"{where}: the adapter uses {said}")


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


def pattern_value(patterns: Mapping[str, float], module: str, *, dotted: bool = False) -> float | None:
    """The value of the first pattern key (in the file's order) that matches a dotted suffix of `module`
    (PEFT's get_pattern_key); `dotted`: FourierFT's and C3A's older rule, where a dot must come before the key."""
    for key, value in patterns.items():
        if re.match(rf".*\.{key}$" if dotted else rf"(.*\.)?({key})$", module):
            return value
    return None


def under_module(names: Sequence[str], module: str) -> bool:
    """PEFT's rule that a module at or below a `modules_to_save` entry is never LoRA-targeted."""
    return any(re.fullmatch(rf"(^|.*\.){re.escape(n)}($|\..*)", module) for n in names)
