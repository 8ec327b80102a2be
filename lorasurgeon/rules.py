"""`--fail-on` rules: parsed from their text, judged on a Report, each firing rule with its reason in words."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lorasurgeon.errors import LorasurgeonError, Option
from lorasurgeon.header import DTYPES, FLOAT_DTYPES

if TYPE_CHECKING:
    from lorasurgeon.report import Report

RuleName = Literal["nan", "inf", "mismatch", "rank", "params", "dtype!=", "dtype=="]
RULE = re.compile(r"^(?:(nan|inf|mismatch)|(rank|params)>(\d+(?:\.\d+)?)([kmb]?)|dtype(!=|==)(\w+))$")
COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
DTYPE_ALIASES = {"fp64": "F64", "fp32": "F32", "fp16": "F16", "bf16": "BF16", "float": "F32", "half": "F16"}
RULE_HELP = "nan, inf, mismatch, rank>N, params>N (K/M/B suffixes), dtype!=X, dtype==X"
NAMES: dict[str, RuleName] = {
    "nan": "nan", "inf": "inf", "mismatch": "mismatch", "rank": "rank", "params": "params", "!=": "dtype!=",
    "==": "dtype==",
}  # fmt: skip


@dataclass(frozen=True)
class Rule:
    text: str
    name: RuleName
    limit: int = 0
    dtype: str = ""


@dataclass(frozen=True)
class Hit:
    rule: str
    reason: str


def parse_rule(text: str) -> Rule:
    """`rank>64`, `params>50M`, `dtype!=bf16`, `nan`, ... -> Rule; anything else is a usage error (exit 2)."""
    match = RULE.match(text.strip().lower().replace(" ", ""))
    if not match:
        raise LorasurgeonError(Option("fail_on", repr(text)), f": unknown rule; expected one of {RULE_HELP}")
    flag, counted, number, suffix, op, dtype = match.groups()
    if flag:
        return Rule(text, NAMES[flag])
    if counted:
        return Rule(text, NAMES[counted], limit=int(float(number) * COUNT_SUFFIXES[suffix]))
    name = DTYPE_ALIASES.get(dtype, dtype.upper())
    if name not in DTYPES:
        raise LorasurgeonError(
            Option("fail_on", repr(text)), f": unknown dtype {dtype!r}; expected e.g. bf16, fp16, fp32, F8_E4M3"
        )
    return Rule(text, NAMES[op], dtype=name)


def judge(report: Report, rules: Iterable[Rule]) -> list[Hit]:
    """The rules that fire on `report`, each with the reason in words."""
    return [Hit(rule.text, reason) for rule in rules if (reason := _reason(report, rule))]


def _reason(report: Report, rule: Rule) -> str | None:
    if rule.name in ("nan", "inf"):
        bad = [s for s in report.stats or () if getattr(s, rule.name)]
        count = sum(getattr(s, rule.name) for s in bad)
        label = {"nan": "NaN", "inf": "±Inf"}[rule.name]
        return f"{count} {label} values in {len(bad)} tensors (first: {bad[0].name})" if bad else None
    if rule.name == "mismatch":
        # a refusal the adapter's own reading and the check against BASE both state counts once
        found = [*report.findings, *(report.check.findings if report.check else ())]
        messages = list(dict.fromkeys(f.message for f in found))
        return f"{len(messages)} findings, the first: {messages[0]}" if messages else None
    if rule.name == "rank":
        over = [m for m in report.modules if m.rank and m.rank > rule.limit]
        top = max((m.rank or 0 for m in over), default=0)
        return f"{len(over)} modules have rank > {rule.limit} (up to {top}; first: {over[0].module})" if over else None
    if rule.name == "params":
        n = report.totals.parameters
        return f"{n:,} parameters > {rule.limit:,}" if n > rule.limit else None
    wanted = rule.name == "dtype=="
    hits = [c for c in report.by_dtype if c.name in FLOAT_DTYPES and (c.name == rule.dtype) == wanted]
    what = ", ".join(f"{c.tensors} tensors are {c.name}" for c in hits)
    return f"{what} ({'' if wanted else 'not '}{rule.dtype})" if hits else None
