"""Typed reading of JSON config fields (adapter_config.json, lora_adapter_metadata): a field of the wrong type is
an InputError naming the file and the field, never a crash later (a huge number, an invalid regular expression,
a rank of 0 are caught here).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorasurgeon.errors import InputError


class FieldReader:
    """Typed access to config fields; a wrong type is an InputError naming the field."""

    def __init__(self, where: Path, config: Mapping[str, Any]) -> None:
        self.where = where
        self.config = config

    def _bad(self, name: str, expected: str) -> InputError:
        return InputError(f"{self.where}: field {name!r} must be {expected}, not {_shown(self.config[name])}")

    def integer(self, name: str, default: int, minimum: int = 1) -> int:
        value = self.config.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self._bad(name, "a positive integer" if minimum == 1 else f"an integer of at least {minimum}")
        if value >= 2**53:  # past a double's integers: alpha / r would overflow or round
            raise self._bad(name, "an integer below 2**53")
        return value

    def number(self, name: str, default: float) -> float:
        value = self.config.get(name, default)
        if not _is_number(value):
            raise self._bad(name, "a finite number")
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.config.get(name, default)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def patterns(self, name: str, positive_integers: bool) -> dict[str, float]:
        """rank_pattern (positive integer values) or alpha_pattern (finite numbers): regex keys are compiled."""
        value = self.config.get(name) or {}
        good = _is_positive_int if positive_integers else _is_number
        if not isinstance(value, dict) or not all(good(v) for v in value.values()):
            kind = "positive integers" if positive_integers else "finite numbers"
            raise self._bad(name, f"an object mapping module patterns to {kind}")
        for key in value:
            self._compile(name, rf"(.*\.)?({key})$", key)
        return {str(k): float(v) for k, v in value.items()}

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.config.get(name) or {}
        if not isinstance(value, dict):
            raise self._bad(name, "an object")
        return value

    def names(self, name: str) -> str | list[str] | None:
        value = self.config.get(name)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise self._bad(name, "a string, a list of strings or null")

    def regex_or_names(self, name: str) -> str | list[str] | None:
        """target_modules / exclude_modules: a string is a regular expression PEFT fullmatches."""
        value = self.names(name)
        if isinstance(value, str):
            self._compile(name, value, value)
        return value

    def _compile(self, name: str, pattern: str, shown: str) -> None:
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise InputError(
                f"{self.where}: field {name!r}: {shown!r} is not a valid regular expression ({e})"
            ) from None

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
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise self._bad(name, "an integer, a list of integers or null")


def _shown(value: Any) -> str:
    """A field's value for a message: short, and never a huge number's thousand digits."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_ints(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _is_positive_int(value: Any) -> bool:
    return _is_number(value) and value >= 1 and float(value).is_integer()


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float (2**1100)
        return False
