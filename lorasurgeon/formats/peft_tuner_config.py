"""The adapter_config.json of a non-LoRA PEFT tuner: typed fields, module selection and per-module patterns.

Selection is PEFT 0.21's `check_target_module_exists` (tuners_utils.py), restated for module paths:
- `exclude_modules`: a string is a regex that must match the whole path; a list matches a path equal to an
  entry or ending with "." + entry. Excluded modules are never adapted.
- a module at or under a `modules_to_save` entry (regex `(^|.*\\.)NAME($|\\..*)`) is never adapted;
- `target_modules`: a string is a full-path regex; a list matches like `exclude_modules`;
- `layers_to_transform` (an int or a list) with `layers_pattern`, only for a list `target_modules` and only
  when the path is not itself an entry: the layer index is the first `<pattern>.<digits>.` of the path (without
  `layers_pattern`, the first `<name>.<digits>.` with a segment before it), and must be listed.
Per-module values come from pattern dicts (`rank_pattern`, `alpha_pattern`, ...), first matching key in file
order, by one of two rules PEFT uses: `get_pattern_key` (`(.*\\.)?KEY$`) or, for FourierFT's and C3A's,
`.*\\.KEY$` (a dot before the key is required).
These helpers are local to the tuner reader (the LoRA reader has its own); the two are to be merged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from lorasurgeon.errors import InputError, MismatchError, UnsupportedError

PatternRule = Literal["suffix", "dotted"]  # get_pattern_key's rule; FourierFT/C3A's older one
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TunerConfig:
    """The config dict of one adapter and its path (for messages), with typed reads that name bad fields."""

    path: Path
    data: Mapping[str, Any]

    @property
    def peft_type(self) -> str:
        return str(self.data.get("peft_type", ""))

    def raw(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name, default)
        return default if value is None else value

    def number(self, name: str, default: float) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{self.path}: {name} is {value!r}, not a number")
        return float(value)

    def integer(self, name: str, default: int) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{self.path}: {name} is {value!r}, not an integer")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise InputError(f"{self.path}: {name} is {value!r}, not true or false")
        return value

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.raw(name, {})
        if not isinstance(value, dict):
            raise InputError(f"{self.path}: {name} is {value!r}, not a mapping")
        return value

    def choice(self, name: str, default: Any, allowed: tuple[Any, ...]) -> Any:
        value = self.raw(name, default)
        if value not in allowed:
            raise UnsupportedError(
                f"{self.path}: {name} is {value!r}; lorasurgeon reads {', '.join(map(repr, allowed))} for "
                f"{self.peft_type}"
            )
        return value

    def refuse_set(self, fields: Mapping[str, str]) -> None:
        """Raise UnsupportedError for the first field (name -> why) set to anything but null/false/empty."""
        for name, why in fields.items():
            if self.data.get(name) not in (None, False, [], {}, "", 0):
                raise UnsupportedError(f"{self.path}: {name} is set ({self.data[name]!r}): {why}")

    def pattern(self, field: str, module: str, default: float, rule: PatternRule = "suffix") -> float:
        """The value of pattern dict `field` for `module`, or `default` when no key matches (see module doc)."""
        for key, value in self.mapping(field).items():
            regex = rf"(.*\.)?({key})$" if rule == "suffix" else rf".*\.{key}$"
            if re.match(regex, module):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(f"{self.path}: {field}[{key!r}] is {value!r}, not a number")
                return float(value)
        return default

    def selects(self, module: str) -> bool:
        """Whether PEFT adapts the module at `module` (see the module docstring)."""
        if _listed(self.raw("exclude_modules"), module):
            return False
        for name in self.raw("modules_to_save", []):
            if re.match(rf"(^|.*\.){name}($|\..*)", module):
                return False
        targets = self.data.get("target_modules")
        if isinstance(targets, str):
            if targets.lower() == "all-linear":
                raise UnsupportedError(
                    f"{self.path}: target_modules is 'all-linear', which PEFT expands from the model's module "
                    "types before saving; lorasurgeon needs the expanded list that save_pretrained writes"
                )
            return re.fullmatch(targets, module) is not None
        if not isinstance(targets, list):
            raise UnsupportedError(f"{self.path}: target_modules is {targets!r}; lorasurgeon needs a list or a regex")
        if module in targets:
            return True
        return any(module.endswith(f".{t}") for t in targets) and self._in_layers(module)

    def _in_layers(self, module: str) -> bool:
        wanted = self.data.get("layers_to_transform")
        if wanted is None or wanted == []:
            return True
        patterns = self.data.get("layers_pattern") or []
        patterns = [patterns] if isinstance(patterns, str) else patterns
        match = None
        if not patterns:  # lazy: the first numbered segment (PEFT >= 0.20), not an MoE expert index after it
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match:
                break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == wanted if isinstance(wanted, int) else index in wanted


def _listed(entries: Any, module: str) -> bool:
    if not entries:
        return False
    if isinstance(entries, str):
        return re.fullmatch(entries, module) is not None
    return module in entries or any(module.endswith(f".{e}") for e in entries)


@dataclass(frozen=True)
class Parsed:
    """What a tuner's `parse` derives for one module: the maths' `params`, the base tensors it `writes` and
    those it `needs` (see tuner.TunerModule)."""

    params: dict[str, Any]
    writes: tuple[str, ...] = ("weight",)
    needs: tuple[str, ...] = ("weight",)


@dataclass(frozen=True)
class Site:
    """One module being read: the config, the weights file (for messages), the module path, the shapes of its
    tensors by role and of the adapter's shared tensors."""

    cfg: TunerConfig
    weights: Path
    module: str
    shapes: Mapping[str, Shape]
    shared: Mapping[str, Shape] = field(default_factory=dict)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def shape(self, role: str) -> Shape:
        if role not in self.shapes:
            self.mismatch(f"lacks {role}")
        return self.shapes[role]

    def mismatch(self, clause: str) -> NoReturn:
        raise MismatchError(f"{self.weights}: module {self.module} {clause}")

    def unsupported(self, clause: str) -> NoReturn:
        raise UnsupportedError(f"{self.cfg.path}: {self.cfg.peft_type} module {self.module}: {clause}")


@dataclass(frozen=True)
class TunerKind:
    """How one tuner's files look: `roles` per module, `shared` adapter-wide tensors (`base_model.<role>`,
    or `base_model.<role>.<name>` when `shared_named`), its per-module `parse`, and the roles every module
    must have (`required`; None: all of `roles` that are not shared); `numbered` roles are matched as regexes."""

    roles: tuple[str, ...]
    parse: Callable[[Site], Parsed]
    shared: tuple[str, ...] = ()
    shared_named: bool = False
    required: tuple[str, ...] | None = None
    numbered: tuple[str, ...] = ()  # roles with an index, as regexes: r"peanut_encoders\.\d+\.weight"

    def check(self, site: Site) -> None:
        """Raise MismatchError when the module lacks a required role."""
        required = self.required if self.required is not None else tuple(r for r in self.roles if r not in self.shared)
        missing = [r for r in required if r not in site.shapes]
        if missing:
            site.mismatch(f"lacks {', '.join(missing)}")
