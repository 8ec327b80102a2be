"""Findings of one kind told once: an adapter for another model size gives the same shape error on every
module, and forty lines of it hide what went wrong. Grouping is how findings are shown, not what they are: the
plan and `--json` keep every finding."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lorasurgeon.errors import Finding, Severity

# Tensor and module names, file names, numbers and shapes: what differs between findings of one kind.
PARTICULARS = re.compile(r"[^\s,;:()\[\]'\"]*[\d.][^\s,;:()\[\]'\"]*")
SMALLEST_GROUP = 3  # two alike findings are shown as they are


@dataclass(frozen=True)
class FindingGroup:
    """`count` findings of the kind of `first`, the first of them in the plan's order."""

    first: Finding
    count: int


def kind(finding: Finding) -> tuple[Severity, str]:
    """A finding's severity and words, its particulars (names, numbers) masked."""
    return finding.severity, PARTICULARS.sub("#", finding.message)


def group_findings(findings: Sequence[Finding]) -> list[FindingGroup]:
    """Findings of the same kind together, at the place of the first; a kind of fewer than SMALLEST_GROUP
    findings stays one finding per group, so nothing is hidden behind a count of two."""
    members: dict[tuple[Severity, str], list[Finding]] = {}
    for finding in findings:
        members.setdefault(kind(finding), []).append(finding)
    groups = []
    for finding in findings:
        alike = members[kind(finding)]
        if len(alike) >= SMALLEST_GROUP:
            if alike[0] is finding:
                groups.append(FindingGroup(finding, len(alike)))
        else:
            groups.append(FindingGroup(finding, 1))
    return groups
