"""The sentences a check, merge or report adds for MoE experts and quantized weights, as plain text for render to
print: experts touched per layer (identical layers folded into one line), the survival of ΔW in the weights
merged in a quantized format (those where the adapter is mostly lost named), a report's experts and layers."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorasurgeon.census import per_layer
from lorasurgeon.report import ModuleReport, Report

if TYPE_CHECKING:  # types only: quantized_steps loads torch, which `check` and `report` do not need
    from lorasurgeon.expert_fit import ExpertCount
    from lorasurgeon.quantized_steps import Requantized

NAMED = 5  # flagged weights named one by one; the rest are counted


def expert_lines(counts: Sequence[ExpertCount]) -> list[str]:
    """One line per run of experts modules that differ only in their layer index: which parameters, how many of
    their experts are touched, the layout on disk."""
    layers: dict[str, list[ExpertCount]] = {}
    for count in counts:
        layers.setdefault(count.module, []).append(count)
    runs: dict[tuple[str, str], list[str]] = {}
    for module, found in layers.items():
        what = ", ".join(
            f"{c.parameter} {c.placed}/{c.targeted} experts ({c.layout}, {c.tensors} tensors)" for c in found
        )
        runs.setdefault((re.sub(r"\.\d+\.", ".N.", module, count=1), what), []).append(module)
    lines = []
    for (pattern, what), modules in runs.items():
        where = modules[0] if len(modules) == 1 else f"{pattern} for {len(modules)} layers"
        lines.append(f"MoE experts touched: {where}: {what}")
    return lines


def requant_lines(figures: Sequence[Requantized], label: str) -> list[str]:
    """The survival of ΔW through re-quantization: a summary line, then the weights where it is mostly lost."""
    if not figures:
        return []
    survival = [f.survival for f in figures]
    worst = max(f.error for f in figures)
    lines = [
        f"{label}: {len(figures)} weights merged in format; ΔW survives re-quantization with median "
        f"{statistics.median(survival):.3f} (min {min(survival):.3f}), worst error ‖D − ΔW‖/‖ΔW‖ {worst:.3f}"
    ]
    lost = [f for f in figures if f.lost]
    for figure in lost[:NAMED]:
        lines.append(
            f"{figure.tensor}: the adapter is mostly lost in the quantized weight (survival {figure.survival:.3f}, "
            f"error {figure.error:.3f}); merge into the 16-bit model, or write a dequantized one with --dtype bf16"
        )
    if len(lost) > NAMED:
        lines.append(f"... and {len(lost) - NAMED} more weights where the adapter is mostly lost")
    return lines


def report_lines(report: Report) -> list[str]:
    """What a report adds about MoE experts and quantization: a checkpoint's experts layout and quantization; an
    adapter's experts modules (experts, LoRA parameters per expert) and its LoRA parameters per layer."""
    if report.kind == "checkpoint":
        lines = [f"MoE experts stored {report.config['experts_layout']}"] if "experts_layout" in report.config else []
        return lines + ([f"quantized: {report.config['quantization']}"] if "quantization" in report.config else [])
    lines = []
    experts: dict[tuple[str, int, int | None], list[ModuleReport]] = {}
    for m in report.modules:
        if m.experts:
            experts.setdefault((m.parameter, m.experts, m.rank), []).append(m)
    for (parameter, count, rank), modules in experts.items():
        each = modules[0].parameters // count
        lines.append(
            f"MoE experts: {parameter} in {len(modules)} layer{'s' if len(modules) > 1 else ''}, {count} experts "
            f"each at rank {rank}: "
            f"{each:,} LoRA parameters per expert"
        )
    layers = per_layer((m.module, m.parameters) for m in report.modules if m.base_parameters)
    if layers:
        values = set(layers.values())
        shown = (
            f"{values.pop():,} in each of {len(layers)} layers"
            if len(values) == 1
            else ", ".join(f"{k}: {v:,}" for k, v in layers.items())
        )
        lines.append(f"LoRA parameters per layer: {shown}")
    return lines
