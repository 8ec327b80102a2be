"""What cannot be combined on one tensor, or cannot be undone (shared FORMATS.md §2.7, §3, §4.5): replacement
tensors and token rows against each other and against LoRA terms (PEFT's saved copies of a base weight aside),
DoRA modules against other terms, scales and unmerge, and the tuners' own rules (tuner_placement). The plan asks
once all terms and sources are gathered."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from lorasurgeon.errors import Finding
from lorasurgeon.tuner_placement import combination_findings as tuner_findings

if TYPE_CHECKING:  # the plan's nouns; the plan imports this module
    from lorasurgeon.placement import Source, Term
    from lorasurgeon.plan import Operation
    from lorasurgeon.tuner_placement import TunerTerm

DORA_UNMERGE = (
    "it is a DoRA module: the merged weight W' = (m/‖W+ΔW‖)·(W+ΔW) has every output row of norm m, so the "
    "per-row norms of the original W are gone and W cannot be recovered from the merged checkpoint"
)


def combination_findings(
    operation: Operation,
    sources: Mapping[str, list[Source]],
    terms: Mapping[str, list[Term]],
    tuners: Mapping[str, list[TunerTerm]],
) -> list[Finding]:
    """What cannot be combined on one tensor, or cannot be undone (FORMATS.md §2.7, §3, §4.5)."""
    problems = []
    for name, found in sources.items():
        if operation == "unmerge":
            problem = "unmerge cannot restore it: the adapter holds its new values, not the original ones"
            problems += [Finding.against(s.tensor.name, name, problem) for s in found]
        elif len(found) > 1 and not _disjoint_rows(found) and not all(s.saved_base for s in found):
            problems.append(Finding.against(found[1].tensor.name, name, "another adapter already sets these values"))
        elif any(s.indices is not None for s in found) and name in terms:
            problem = "trainable token rows and a LoRA on the same tensor cannot be merged in a defined order"
            problems.append(Finding.against(found[0].tensor.name, name, problem))
    for name, changes in terms.items():
        dora = next((t for t in changes if t.dora), None)
        if dora is None:
            continue
        key = dora.module.a.name
        if operation == "unmerge":
            problems.append(Finding.against(key, name, f"DoRA cannot be unmerged: {DORA_UNMERGE}"))
        elif len([t for t in changes if not t.bias]) > 1:
            problems.append(Finding.against(key, name, "a DoRA module must be the only adapter changing its weight"))
        elif abs(dora.factor - dora.module.scale) > 1e-12 * abs(dora.module.scale):
            problems.append(Finding.against(key, name, "a DoRA module can only be merged with weight 1 and scale 1"))
    return problems + tuner_findings(operation, tuners, terms, sources)


def _disjoint_rows(sources: list[Source]) -> bool:
    """True when the sources only set rows, and no row twice (a whole replacement conflicts with anything)."""
    if any(s.indices is None for s in sources):
        return False
    rows = [i for s in sources for i in s.indices or ()]
    return len(rows) == len(set(rows))
