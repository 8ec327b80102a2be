"""Adapters: read a PEFT LoRA adapter (directory or file) into one normal form, `Adapter` of `LoraModule`s.

Loading reads headers and the config only; factor tensors stay on disk until the plan or the surgery reads
them. Everything the adapter holds that lorasurgeon cannot apply exactly is refused here, by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasurgeon import keys
from lorasurgeon.checkpoint import Checkpoint, read_json, refuse_pickle
from lorasurgeon.errors import InputError, MismatchError, UnsupportedError
from lorasurgeon.header import TensorInfo

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Config fields whose non-default value means the adapter is not plain LoRA; each is refused by name.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "full replacement modules (modules_to_save)",
    "layer_replication": "layer replication (layer_replication), which PEFT cannot merge either",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which cannot be merged",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
}
# init_lora_weights values that rewrite the base during training: merging into the original base is wrong.
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "mica")
ROLE_NAMES = {
    "lora_B_bias": "a LoRA bias (lora_B.bias)",
    "lora_embedding_A": "an embedding LoRA factor",
    "lora_embedding_B": "an embedding LoRA factor",
    "lora_magnitude_vector": "a DoRA magnitude vector",
    "trainable_tokens_delta": "trainable token rows",
    "replacement": "a full replacement tensor (modules_to_save, saved embedding or bias)",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its path in the model, its factors on disk, and its effective scale."""

    module: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool

    @property
    def target(self) -> str:
        """The checkpoint tensor this module changes (before prefix resolution)."""
        return f"{self.module}.weight"


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in normal form; `source` reads its factor tensors."""

    path: Path
    format: str
    config: dict[str, Any]
    modules: tuple[LoraModule, ...]
    ignored: tuple[str, ...]
    source: Checkpoint
    use_rslora: bool = False


def load_adapter(path: Path, alpha: float | None = None) -> Adapter:
    """Read a PEFT adapter directory or `.safetensors` file.

    The config (adapter_config.json, in the directory or beside the file) gives rank, alpha and the
    module selection; without one, `alpha` must be given and every module in the file is used.
    `alpha`, when given, replaces lora_alpha and every alpha_pattern value.
    Raises InputError (unreadable), UnsupportedError (not plain Linear LoRA), MismatchError (A without B).
    """
    weights, config_path = _locate(Path(path))
    if config_path is None and alpha is None:
        raise InputError(
            f"{weights}: no {CONFIG_NAME} beside it, so the LoRA scale is unknown; pass --alpha "
            "(the lora_alpha it was trained with)"
        )
    config = read_json(config_path) if config_path else {}
    settings = _Settings.parse(config_path or weights, config, alpha)
    source = Checkpoint.open(weights)
    try:
        modules, ignored = _modules(source, settings, selected_only=config_path is not None)
    except Exception:
        source.close()
        raise
    return Adapter(Path(path), "peft", config, tuple(modules), tuple(ignored), source, settings.use_rslora)


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config file or None) for an adapter directory or file."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        candidates = [path, *sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())]
        for folder in candidates:
            if (folder / WEIGHTS_NAME).is_file():
                config = folder / CONFIG_NAME
                return folder / WEIGHTS_NAME, config if config.is_file() else None
        refuse_pickle(path / "adapter_model.bin")  # the legacy name, if that is all there is
        raise InputError(f"{path}: holds no {WEIGHTS_NAME}")
    refuse_pickle(path)
    config = path.parent / CONFIG_NAME
    return path, config if config.is_file() else None


@dataclass(frozen=True)
class _Settings:
    rank: int
    alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, float]
    alpha_pattern: dict[str, float]
    target_modules: str | list[str] | None
    exclude_modules: str | list[str] | None
    layers_to_transform: int | list[int] | None
    layers_pattern: str | list[str] | None

    @classmethod
    def parse(cls, where: Path, config: Mapping[str, Any], alpha: float | None) -> _Settings:
        _refuse_unsupported(where, config)
        field = _FieldReader(where, config)
        rank = field.integer("r", 8)
        alpha_pattern = field.numbers("alpha_pattern")
        return cls(
            rank=rank,
            alpha=alpha if alpha is not None else field.number("lora_alpha", 8),
            use_rslora=field.boolean("use_rslora"),
            fan_in_fan_out=field.boolean("fan_in_fan_out"),
            rank_pattern=field.numbers("rank_pattern"),
            alpha_pattern={k: alpha for k in alpha_pattern} if alpha is not None else alpha_pattern,
            target_modules=field.names("target_modules"),
            exclude_modules=field.names("exclude_modules"),
            layers_to_transform=field.layers("layers_to_transform"),
            layers_pattern=field.names("layers_pattern"),
        )

    def selects(self, module: str) -> bool:
        """PEFT's check_target_module_exists, for adapters that have a config."""
        if keys.module_selected(self.exclude_modules, module):
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


def _refuse_unsupported(where: Path, config: Mapping[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedError(f"{where}: peft_type {peft_type!r} is not LoRA")
    found = [label for name, label in UNSUPPORTED_FIELDS.items() if config.get(name) not in (None, False, [], {})]
    if config.get("bias", "none") != "none":
        found.append(f"trained biases (bias={config['bias']!r})")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        found.append(f"init_lora_weights={init!r}, which rewrites the base during training")
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

    def layers(self, name: str) -> int | list[int] | None:
        value = self.config.get(name)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return list(value)
        raise self._bad(name, "an integer, a list of integers or null")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _modules(source: Checkpoint, settings: _Settings, selected_only: bool) -> tuple[list[LoraModule], list[str]]:
    factors: dict[str, dict[str, TensorInfo]] = {}
    for info in source:
        key = keys.split_peft_key(info.name)
        if key.role not in ("lora_A", "lora_B"):
            raise UnsupportedError(
                f"{source.path}: {info.name} is {ROLE_NAMES[key.role]}, which lorasurgeon cannot merge yet"
            )
        factors.setdefault(key.module, {})[key.role] = info
    modules, ignored = [], []
    for module, pair in factors.items():
        if "lora_A" not in pair or "lora_B" not in pair:
            have, missing = ("lora_A", "lora_B") if "lora_A" in pair else ("lora_B", "lora_A")
            raise MismatchError(f"{source.path}: {pair[have].name} has no matching {missing} tensor")
        if selected_only and not settings.selects(module):
            ignored.extend(sorted(info.name for info in pair.values()))
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise UnsupportedError(
                f"{source.path}: {a.name} has shape {list(a.shape)}: convolution LoRA cannot be merged yet"
            )
        rank, alpha = settings.rank_alpha(module) if selected_only else (a.shape[0], settings.alpha)
        scale = alpha / math.sqrt(rank) if settings.use_rslora else alpha / rank
        modules.append(LoraModule(module, a, b, rank, alpha, scale, settings.fan_in_fan_out))
    return modules, ignored
