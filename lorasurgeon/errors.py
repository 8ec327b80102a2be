"""The errors lorasurgeon raises on purpose. Each carries one whole sentence for the user and an exit code.

Anything else that escapes the library is a bug, and the CLI shows it as one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """Something `check` found, not raised but reported: an error stops merge/unmerge, a warning does not."""

    severity: str  # "error" | "warning"
    message: str
    adapter_key: str | None = None
    base_key: str | None = None


class LorasurgeonError(Exception):
    """Base class: a sentence a person can act on, naming the file and the tensor or key involved."""

    exit_code = 2


class InputError(LorasurgeonError):
    """An input file is unreadable, malformed, unsafe or of a format we do not read."""


class UnsupportedError(LorasurgeonError):
    """The input is valid but asks for something lorasurgeon does not do (yet); never silently skipped."""


class MismatchError(LorasurgeonError):
    """The adapter does not fit the checkpoint (shapes, ranks, names)."""


class OutputError(LorasurgeonError):
    """The output cannot be written where asked: it exists, is an input, or the disk refused it."""


class NumericError(LorasurgeonError):
    """A tensor holds or would produce values that cannot be trusted (NaN, Inf, overflow)."""


class NonfiniteWarning(UserWarning):
    """NaN/Inf values let through by `allow_nonfinite`; the CLI shows each as a `warning:` line."""


class NothingChangedError(MismatchError):
    """BASE and TUNED agree on every target matrix: there is no adapter to extract (exit 1, like a check)."""

    exit_code = 1
