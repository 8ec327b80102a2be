"""The adapter_config.json of a PEFT tuner other than LoRA, and the types its per-tuner tables are written in.

Fields are read with formats.config_fields (a field of the wrong type is an InputError naming it; a null field
takes its default, as PEFT's dataclass does); module selection and per-module patterns are PEFT's own rules, kept
once in formats.peft_config (`Selection`, `pattern_value`). A value PEFT accepts but lorasurgeon does not read is
an UnsupportedError naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from lorasurgeon.errors import InputError, MismatchError, UnsupportedError
from lorasurgeon.formats.config_fields import FieldReader
from lorasurgeon.formats.peft_config import Selection, pattern_value

Shape = tuple[int, ...]
# What a tuner's files become in the normal form: modules (TunerModule), or base tensors set outright (LN
# tuning's norms are Replacements; the trainable-tokens tuner's rows are TokenRows, as in a LoRA adapter).
Form = Literal["module", "replacement", "rows"]


class TunerConfig:
    """The config dict of one adapter and its path (for messages), with typed reads that name bad fields."""

    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        self.path = path
        self.data = data
        self.field = FieldReader(path, {k: v for k, v in data.items() if v is not None})
        targets = data.get("target_modules")
        if isinstance(targets, str) and targets.lower() == "all-linear":
            raise UnsupportedError(
                f"{path}: target_modules is 'all-linear', which PEFT expands from the model's module types before "
                "saving; lorasurgeon needs the expanded list that save_pretrained writes"
            )
        self.selection = Selection.parse(self.field)

    @property
    def peft_type(self) -> str:
        return str(self.data.get("peft_type", ""))

    def raw(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name, default)
        return default if value is None else value

    def number(self, name: str, default: float) -> float:
        return self.field.number(name, default)

    def integer(self, name: str, default: int, minimum: int = 1) -> int:
        return self.field.integer(name, default, minimum)

    def flag(self, name: str, default: bool) -> bool:
        return self.field.boolean(name, default)

    def mapping(self, name: str) -> dict[str, Any]:
        return self.field.mapping(name)

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

    def pattern(self, name: str, module: str, default: float, *, dotted: bool = False) -> float:
        """The value of pattern dict `name` (rank_pattern, ...) for `module`, or `default` when no key matches."""
        value = pattern_value(self.field.patterns(name, positive_integers=False), module, dotted=dotted)
        return default if value is None else value

    def selects(self, module: str) -> bool:
        return self.selection.selects(module)


@dataclass(frozen=True)
class Parsed:
    """What a tuner's `parse` derives for one module: the maths' `params`, the base tensors it `writes` and
    those it `needs` (see adapter.TunerModule)."""

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

    def bad_field(self, clause: str) -> NoReturn:
        raise InputError(f"{self.cfg.path}: {clause}")


def _no_params(site: Site) -> Parsed:
    return Parsed({})


@dataclass(frozen=True)
class TunerKind:
    """How one tuner's files look: `roles` per module, `shared` adapter-wide tensors (`base_model.<role>`,
    or `base_model.<role>.<name>` when `shared_named`), its per-module `parse`, and the roles every module
    must have (`required`; None: all of `roles` that are not shared); `numbered` roles are matched as regexes;
    `form` says what the normal form holds for it."""

    roles: tuple[str, ...]
    parse: Callable[[Site], Parsed] = _no_params
    shared: tuple[str, ...] = ()
    shared_named: bool = False
    required: tuple[str, ...] | None = None
    numbered: tuple[str, ...] = ()  # roles with an index, as regexes: r"peanut_encoders\.\d+\.weight"
    form: Form = "module"

    def check(self, site: Site) -> None:
        """Raise MismatchError when the module lacks a required role."""
        required = self.required if self.required is not None else tuple(r for r in self.roles if r not in self.shared)
        missing = [r for r in required if r not in site.shapes]
        if missing:
            site.mismatch(f"lacks {', '.join(missing)}")
