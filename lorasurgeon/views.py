"""What people read, as plain text: (title, columns, rows) tables, Markdown and the sentences that close a command,
which render.py draws on the terminal (the `--json` documents are in documents.py). No terminal here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorasurgeon.units import size

if TYPE_CHECKING:  # not imported at run time: they load torch
    from lorasurgeon.conversion import ConvertSummary
    from lorasurgeon.extraction import ExtractSummary
    from lorasurgeon.verification import VerifySummary

Tables = list[tuple[str, list[str], list[list[str]]]]


def markdown_tables(tables: Tables) -> list[str]:
    """Tables as GitHub Markdown lines (for a CI job summary)."""
    lines = []
    for title, columns, rows in tables:
        lines += [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    return lines


def verify_tables(summary: VerifySummary) -> Tables:
    """The tensors the adapters change and every problem, then the companion files."""
    rows = []
    for t in summary.tensors:
        if t.adapters or not t.proven:
            v = t.verdict
            ulps, scale = ("", "") if v is None else (f"{v.max_ulps:.3g}", "" if v.scale is None else f"{v.scale:.4g}")
            rows.append([t.name, t.kind, ulps, scale, ", ".join(t.adapters)])
    title = f"verify: {summary.merged} against {summary.base} + {', '.join(summary.adapters)}"
    tables = [(title, ["tensor", "verdict", "max ulps", "scale", "adapters"], rows)]
    if summary.files:
        tables.append(("files", ["file", "verdict", "detail"], [[f.name, f.kind, f.detail] for f in summary.files]))
    return tables


def verify_verdict(summary: VerifySummary) -> str:
    """The one line verify ends with."""
    if not summary.ok:
        return f"not verified: {len(summary.problems)} problems"
    changed = [t for t in summary.tensors if t.adapters]
    exact = sum(t.kind == "exact" for t in changed)
    files = f"; {len(summary.files)} files agree" if summary.files else ""
    return (
        f"verified: {len(summary.tensors)} tensors proven within {summary.tolerance} ulp ({len(changed)} changed by "
        f"the adapters, {exact} of them exact; {len(summary.tensors) - len(changed)} unchanged){files}"
    )


def verify_markdown(summary: VerifySummary) -> str:
    lines = markdown_tables(verify_tables(summary))
    lines += [f"- **problem**: {problem.message}" for problem in summary.problems]
    return "\n".join([*lines, f"\n**{verify_verdict(summary)}**"]) + "\n"


def extract_notes(summary: ExtractSummary) -> list[str]:
    """What the adapter's config states beyond ranks: the one alpha and the modules it is folded into."""
    if not summary.folded:
        return []
    alpha = summary.config["lora_alpha"]
    return [
        f"one lora_alpha = {alpha}: the {len(summary.folded)} modules whose rank is not lora_alpha carry "
        "lora_alpha / rᵢ in their factors, as llama.cpp and other single-alpha readers need (--patterns writes "
        "alpha_pattern instead)"
    ]


def convert_lines(summary: ConvertSummary) -> list[str]:
    """What convert wrote: the output, how its factors relate to the source's, the fold, the padding, additions."""
    verb = "would write" if summary.dry_run else "wrote"
    written = "" if summary.dry_run else f", {size(summary.bytes_written)}, {summary.seconds:.1f} s"
    rewritten = sum(c.rewritten for c in summary.modules)
    kept = f"factors of {rewritten} rewritten, the others byte for byte" if rewritten else "A and B bytes unchanged"
    lowered = f", lowered for {summary.runtime}" if summary.runtime else ""
    lines = [
        f"convert: {verb} {summary.output} ({summary.target_format} from {summary.source.format}{lowered}, "
        f"{len(summary.modules)} modules, {kept}{written})"
    ]
    if summary.folded:
        alpha = summary.modules[0].alpha
        lines.append(
            f"one lora_alpha = {alpha:g}: B′ = B·sᵢ·rᵢ/{alpha:g} (one rounding) for {_some(summary.folded)}, whose "
            "scale it does not give (--patterns keeps PEFT's alpha_pattern / rsLoRA form and every byte)"
        )
    padded = [f"every module padded with zeros to rank {summary.rank}"] if summary.rank is not None else []
    added = [f"added {_some(summary.added)}"] if summary.added else []
    if padded or added:
        lines.append(f"{summary.runtime}: " + "; ".join(padded + added))
    return lines


def _some(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
