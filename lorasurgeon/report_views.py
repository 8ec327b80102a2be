"""What people read of a report, as plain text: its (title, columns, rows) tables, which render.py draws on the
terminal, and its Markdown (for a CI job summary). No terminal here.
"""

from __future__ import annotations

from typing import Any

from lorasurgeon import views
from lorasurgeon.census import Count
from lorasurgeon.report import ModuleReport, Report
from lorasurgeon.units import size


def report_tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, columns, rows) tables, shared by the rich and the Markdown renderings."""
    t = report.totals
    title = f"{report.path}: {report.kind} ({report.format}), {t.tensors} tensors, {t.parameters:,} parameters"
    tables = [(title, ["dtype", "tensors", "parameters", "bytes"], [_count_row(c) for c in report.by_dtype])]
    tables.append(("categories", ["category", "tensors", "parameters", "bytes"], _rows(report.categories)))
    if report.groups:
        rows = [
            [f"{c.name} ×{c.repeat} [{c.indices}]" if c.indices else c.name, *_count_row(c)[1:]] for c in report.groups
        ]
        tables.append(("groups (per block)", ["group", "tensors", "parameters", "bytes"], rows))
    if report.tuner is not None:  # a PEFT tuner other than LoRA: what it is, and what lorasurgeon does with it
        tuner = report.tuner
        facts = {"is": tuner.what, "changes": tuner.changes, "merge": tuner.merge, "unmerge": tuner.unmerge}
        facts["convert"] = tuner.convert
        tables.append((f"{tuner.name} ({tuner.peft_type})", ["", ""], [[k, v] for k, v in facts.items()]))
    if report.kind == "adapter":
        tables.append(_targets_table(report))
    shard_rows = [[*_count_row(c), _meta(c.metadata)] for c in report.shards]
    tables.append(("files", ["file", "tensors", "parameters", "size", "metadata"], shard_rows))
    if report.stats is not None:
        tables.append(_stats_table(report))
    if any(m.stable_rank is not None for m in report.modules):
        tables.append(_delta_table(report))
    return tables


def _count_row(c: Count) -> list[str]:
    return [c.name, str(c.tensors), f"{c.parameters:,}", size(c.bytes)]


def _rows(counts: tuple[Count, ...]) -> list[list[str]]:
    return [_count_row(c) for c in counts]


def _meta(metadata: dict[str, str]) -> str:
    return ", ".join(f"{k}={v if len(v) < 40 else v[:37] + '...'}" for k, v in metadata.items())


def _targets_table(report: Report) -> tuple[str, list[str], list[list[str]]]:
    by_target: dict[str, list[ModuleReport]] = {}
    for m in report.modules:
        by_target.setdefault(m.module.rpartition(".")[2], []).append(m)
    rows = []
    for name, modules in sorted(by_target.items()):
        lora, base = sum(m.parameters for m in modules), sum(m.base_parameters or 0 for m in modules)
        shapes = sorted({"×".join(map(str, m.base_shape)) for m in modules if m.base_shape})
        rows.append(
            [
                name,
                str(len(modules)),
                _distinct(m.kind for m in modules),
                _distinct(m.rank for m in modules),
                _distinct(m.alpha for m in modules),
                _distinct(m.scale for m in modules),
                ", ".join(shapes),
                f"{lora:,}",
                f"{base:,}" if base else "",
                f"{1 - lora / base:.2%}" if base else "",
            ]
        )
    lora, base = report.lora_parameters
    title = f"LoRA: {lora:,} parameters adapting {base:,} base parameters"
    title += f" ({1 - lora / base:.2%} fewer)" if base else ""
    if report.tuner is not None:
        title = f"{report.tuner.name}: {sum(m.parameters for m in report.modules):,} parameters"
    columns = ["target", "matrices", "kind", "rank", "alpha", "scale", "base shape", "LoRA", "base", "reduction"]
    return title, columns, rows


def _distinct(values: Any) -> str:
    return ", ".join(sorted({"" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values}))


def _stats_table(report: Report) -> tuple[str, list[str], list[list[str]]]:
    rows = [
        [s.name, s.dtype, str(s.nan), str(s.inf), number(s.min), number(s.max), number(s.mean), number(s.std)]
        for s in report.stats or ()
    ]
    return "tensor statistics", ["tensor", "dtype", "NaN", "Inf", "min", "max", "mean", "std"], rows


def _delta_table(report: Report) -> tuple[str, list[str], list[list[str]]]:
    rows = [
        [m.module, number(m.delta_norm), number(m.delta_spectral_norm), number(m.stable_rank)]
        for m in report.modules
        if m.stable_rank is not None
    ]
    return "ΔW = scale·BA (from r×r Gram matrices)", ["module", "‖ΔW‖_F", "‖ΔW‖_2", "stable rank"], rows


def number(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def report_markdown(report: Report) -> str:
    """The report as GitHub Markdown (for a CI job summary)."""
    lines = views.markdown_tables(report_tables(report))
    findings = [*report.findings, *(report.check.findings if report.check else ())]
    lines += [f"- **{f.severity}**: {f.words('cli')}" for f in findings]
    lines += [f"- **fail-on `{h.rule}`**: {h.reason}" for h in report.fired]
    if report.check:
        c = report.check
        lines.append(f"- touches {c.touched_parameters:,} of {c.base_parameters:,} base parameters of `{c.base}`")
    lines.append(f"\n**{'passed' if not report.fired else 'failed: ' + ', '.join(h.rule for h in report.fired)}**")
    return "\n".join(lines) + "\n"
