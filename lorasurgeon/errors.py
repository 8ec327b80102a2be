"""The errors lorasurgeon raises on purpose. Each carries one whole sentence for the user and an exit code.

A sentence that names an option (`force`, `alpha`, ...) holds it as an `Option`, so the library says
`force=True` and the command line says `--force`, each in its caller's words; nobody matches on the text.
Anything else that escapes the library is a bug, and the CLI shows it as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]
Wording = Literal["api", "cli"]
_NO_VALUE = object()


@dataclass(frozen=True)
class Option:
    """An option named in a message: `Option("force", flag=True)` reads `force=True` from the library and
    `--force` on the command line; `Option("rank", 0)` reads `rank=0` and `--rank 0`; `Option("alpha")` reads
    `alpha=…` and `--alpha`."""

    name: str
    value: object = _NO_VALUE
    flag: bool = False
    cli: str = ""  # the flag's name when it is not the parameter's with dashes (weights -> --weight)
    metavar: str = ""  # what stands for a value not given (`Option("rank", metavar="R")`: rank=R, --rank R)

    def words(self, wording: Wording) -> str:
        given = self.value is not _NO_VALUE
        if wording == "api":
            shown = "True" if self.flag else repr(self.value) if given else self.metavar or "…"
            return f"{self.name}={shown}"
        flag = "--" + (self.cli or self.name.replace("_", "-"))
        value = str(self.value) if given else self.metavar
        return flag if self.flag or not value else f"{flag} {value}"


Part = str | Option


def render(parts: Sequence[Part], wording: Wording = "api") -> str:
    """A message's parts as one sentence in `wording`."""
    return "".join(p if isinstance(p, str) else p.words(wording) for p in parts)


@dataclass(frozen=True)
class Finding:
    """Something `check` found, not raised but reported: an error stops merge/unmerge, a warning does not.

    `parts` are the sentence (see Option); `message` is it in the library's words."""

    severity: Severity
    parts: tuple[Part, ...]
    adapter_key: str | None = None
    base_key: str | None = None

    @classmethod
    def of(
        cls, severity: Severity, *parts: Part, adapter_key: str | None = None, base_key: str | None = None
    ) -> Finding:
        return cls(severity, parts, adapter_key, base_key)

    @classmethod
    def against(cls, adapter_key: str, base_key: str | None, *parts: Part, severity: Severity = "error") -> Finding:
        """A finding about adapter tensor `adapter_key` (and the base tensor it meets): `a -> b: problem`."""
        where = f"{adapter_key} -> {base_key}: " if base_key else f"{adapter_key}: "
        return cls(severity, (where, *parts), adapter_key, base_key)

    @property
    def message(self) -> str:
        return render(self.parts)

    def words(self, wording: Wording) -> str:
        return render(self.parts, wording)


class LorasurgeonError(Exception):
    """Base class: a sentence a person can act on, naming the file and the tensor or key involved."""

    exit_code = 2

    def __init__(self, *parts: Part) -> None:
        self.parts = parts
        super().__init__(render(parts))

    def words(self, wording: Wording) -> str:
        return render(self.parts, wording)


class Refusals:
    """Where a reader puts what it cannot accept: raised at once when `strict`, else kept as error findings, so
    one reader serves both the merge (which refuses) and the report (which describes)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.findings: list[Finding] = []

    def add(self, error: LorasurgeonError, severity: Severity = "error") -> None:
        if self.strict:
            raise error
        self.findings.append(Finding(severity, error.parts))


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

    def __init__(self, *parts: Part) -> None:
        self.parts = parts
        super().__init__(render(parts))

    def words(self, wording: Wording) -> str:
        return render(self.parts, wording)


class NothingChangedError(MismatchError):
    """BASE and TUNED agree on every target matrix: there is no adapter to extract. An error like any other (exit
    code 2): exit code 1 is only ever a verdict of `check` or `report --fail-on`, never a failure to do the work."""
