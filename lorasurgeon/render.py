"""Everything people read: rich tables, findings and progress on stderr (the `--json` documents are in
documents.py, the report's tables as text in report_views.py), in the command line's words."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from lorasurgeon import progress_bar as bars
from lorasurgeon import views
from lorasurgeon.adapter_documents import extract_doc
from lorasurgeon.digest import expert_lines, report_lines, requant_lines
from lorasurgeon.documents import plan_doc, summary_doc
from lorasurgeon.errors import Finding, UnsupportedError
from lorasurgeon.finding_groups import group_findings
from lorasurgeon.progress import Progress
from lorasurgeon.report import Report
from lorasurgeon.report_views import number, report_tables
from lorasurgeon.tables import Column, Fitted, Kind
from lorasurgeon.units import size

if TYPE_CHECKING:  # not imported at run time: they load torch, which `report` does not need
    from lorasurgeon.algebra import AlgebraSummary
    from lorasurgeon.cluster import WorkReport
    from lorasurgeon.conversion import ConvertSummary
    from lorasurgeon.extraction import ExtractSummary
    from lorasurgeon.plan import Plan
    from lorasurgeon.surgery import SurgerySummary
    from lorasurgeon.verification import VerifySummary

# Wide when piped (CI logs, README examples), so tensor names are not cut.
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
REPORT_TEXT = {"metadata"}  # report columns of words, which may wrap; the rest are numbers or labels
REPORT_LABELS = {"dtype", "kind"}


def progress_bar(label: str) -> contextlib.AbstractContextManager[Callable[[Progress], None] | None]:
    """A progress callback drawing phases, tensors and bytes on stderr (lorasurgeon.progress_bar); None (silent)
    when stderr is piped."""
    return bars.progress_bar(label, stderr)


def show_check(plan: Plan, target: str | None = None) -> None:
    """The check table: one row per adapted module (none when nothing fits), then the findings, grouped by kind
    (with `target`, the runtime's rules' too)."""
    doc = plan_doc(plan)
    paths = [a["path"] for a in doc["adapters"]]
    several = len(paths) > 1  # one adapter is named in the title, not on every row
    title = f"{plan.base.path}: {len(plan.base.tensors)} tensors" + ("" if several else f"; adapter {paths[0]}")
    rows = []
    for row in (r for r in doc["modules"] if r["expert"] is None and r["kind"] != "experts"):  # experts: counted
        shape = "x".join(map(str, row["shape"])) + (" (T)" if row["transposed"] else "")
        rank = row["kind"] if row["rank"] is None else str(row["rank"])  # another tuner than LoRA: its name
        cells = [row["base_key"], shape, rank, number(row["alpha"]), number(row["scale"])]
        rows.append([row["adapter"], *cells] if several else cells)
    columns = [Column("base tensor", "name"), *map(Column, ("shape", "rank", "alpha", "scale"))]
    if rows:
        stderr.print(Fitted([Column("adapter", "name"), *columns] if several else columns, rows, title))
    for line in expert_lines(plan.experts):
        stderr.print(line, soft_wrap=True)
    show_findings(plan.findings)
    problems = f" ({len(plan.errors)} problems; --json lists each)" if len(plan.errors) > 1 else ""
    verdict = "[green]fits[/]" if not plan.errors else f"[red]does not fit[/]{problems}"
    runs = f" and {target} reads it as PEFT does" if target and not plan.errors else f" on {target}" if target else ""
    stderr.print(f"{len(doc['modules'])} modules checked: the adapter {verdict}{runs}")


def show_findings(findings: tuple[Finding, ...] | list[Finding]) -> None:
    """One line per finding, or per kind where several are alike (the first one, and how many; --json has all)."""
    for group in group_findings(findings):
        f = group.first
        colour = "red" if f.severity == "error" else "yellow"
        alike = f" ({group.count} like this)" if group.count > 1 else ""
        stderr.print(f"[{colour}]{f.severity}{alike}:[/] {f.words('cli')}", soft_wrap=True)


def show_summary(summary: SurgerySummary) -> None:
    show_findings(summary.plan.warnings)
    if summary.dry_run:
        show_plan(summary)
        return
    stderr.print(
        f"{summary.operation}: wrote {summary.output} ({summary.changed} of {summary.tensors} tensors changed, "
        f"{size(summary.bytes_written)}, {summary.seconds:.1f} s on {summary.device})",
        soft_wrap=True,
    )
    label = summary.plan.quantization.label if summary.plan.quantization else ""
    for line in [*expert_lines(summary.plan.experts), *requant_lines(summary.requantized, label)]:
        stderr.print(line if "mostly lost" not in line else f"[yellow]warning:[/] {line}", soft_wrap=True)
    for path in summary.removed_temporaries:
        stderr.print(f"removed {path}, left by an interrupted run", soft_wrap=True)
    for name in summary.skipped_files:
        stderr.print(f"[yellow]skipped[/] {name}: weights in another file format would contradict the merged ones")


def show_plan(summary: SurgerySummary) -> None:
    title = f"dry run: {summary.operation} into {summary.output} (nothing written)"
    columns = [Column("shard", "name"), Column("tensor", "name"), Column("dtype", "label"), Column("adapters", "text")]
    rows = [[r["shard"], r["tensor"], r["dtype"], ", ".join(r["adapters"])] for r in summary_doc(summary)["steps"]]
    stderr.print(Fitted(columns, rows, title))
    stderr.print(f"{summary.changed} of {summary.tensors} tensors would change; the rest are copied byte for byte")


def show_report(report: Report) -> None:
    """The report as rich tables on stderr, then its findings, the check and the rules that fired."""
    for title, columns, rows in report_tables(report):
        stderr.print(f"[bold]{title}[/]", soft_wrap=True)
        stderr.print(Fitted([Column(c, _report_kind(i, c)) for i, c in enumerate(columns)], rows))
    for line in report_lines(report):
        stderr.print(line, soft_wrap=True)
    show_findings(report.findings)
    if report.check:
        show_findings(report.check.findings)
        c = report.check
        stderr.print(
            f"{c.base}: the adapter touches {c.touched_parameters:,} of {c.base_parameters:,} base "
            f"parameters ({c.touched_parameters / max(c.base_parameters, 1):.2%})"
        )
    show_fired(report)


def _report_kind(index: int, column: str) -> Kind:
    if index == 0:
        return "name"
    return "text" if column in REPORT_TEXT else "label" if column in REPORT_LABELS else "number"


def show_fired(report: Report) -> None:
    for hit in report.fired:
        stderr.print(f"[red]fail-on {hit.rule}:[/] {hit.reason}", soft_wrap=True)


def show_verify(summary: VerifySummary) -> None:
    """The verify tables, each problem, and the verdict, on stderr."""
    for title, columns, rows in views.verify_tables(summary):
        kinds: list[Kind] = [
            "name",
            *("label" if c in ("verdict", "adapters", "detail") else "number" for c in columns[1:]),
        ]
        stderr.print(Fitted([Column(c, k) for c, k in zip(columns, kinds, strict=True)], rows, title))
    for problem in summary.problems:
        stderr.print(f"[red]problem:[/] {problem.message}", soft_wrap=True)
    if summary.work is not None and (summary.work.engine != "local" or summary.work.resumed):
        show_work(summary.work, summary.resumed_from)
    stderr.print(views.verify_verdict(summary), soft_wrap=True)


def show_extract(summary: ExtractSummary) -> None:
    """The extract table on stderr: one row per matrix, a total row, then what the adapter leaves out."""
    show_findings(summary.warnings)
    doc = extract_doc(summary)
    curve = [Column(f"err@{r}") for r in summary.curve]
    columns = [Column("tensor", "name"), Column("shape"), Column("rank"), Column("method", "label")]
    columns += [Column("energy"), Column("rel. error"), *curve, Column("params")]
    rows = []
    for m in doc["matrices"]:
        shape = "x".join(map(str, m["shape"]))
        share = m["adapter_params"] / (m["shape"][0] * m["shape"][1])
        rows.append([
            m["tensor"], shape, str(m["rank"]), m["method"], f"{m['captured_energy']:.4f}",
            f"{m['relative_error']:.4f}", *(f"{e:.4f}" for e in m["curve"]), f"{share:.1%}",
        ])  # fmt: skip
    total = doc["total"]
    share = total["adapter_params"] / max(total["replaced_params"], 1)
    last = [
        f"total ({total['matrices']} matrices)", "", "", "", f"{total['captured_energy']:.4f}",
        f"{total['relative_error']:.4f}", *(f"{e:.4f}" for e in total["curve"]), f"{share:.1%}",
    ]  # fmt: skip
    stderr.print(Fitted(columns, rows, f"extract: {summary.tuned} − {summary.base}", total=last))
    for c in summary.changed_other:
        shape = "x".join(map(str, c.shape))
        saved = c.name.rpartition(".")[0] in summary.saved_modules
        where = "saved in full:" if saved else "[yellow]not in the adapter:[/]"
        stderr.print(f"{where} {c.name} ({shape}) changed by up to {c.max_change:.3g}")
    if summary.unchanged:
        stderr.print(f"{len(summary.unchanged)} target matrices are unchanged and have no LoRA factors")
    for note in views.extract_notes(summary):
        stderr.print(note, soft_wrap=True)
    if summary.work is not None and (summary.work.engine != "local" or summary.work.resumed):
        show_work(summary.work, summary.resumed_from)
    if summary.dry_run:
        stderr.print("dry run: no adapter written")
    else:
        stderr.print(
            f"extract: wrote {summary.output} ({len(summary.matrices)} matrices, "
            f"{size(summary.bytes_written)}, {summary.seconds:.1f} s on {summary.device})",
            soft_wrap=True,
        )


def show_work(work: WorkReport, resumed_from: str | None) -> None:
    """Where the per-step tasks ran: one line per node, then the retried and resumed counts."""
    for n in work.nodes:
        stderr.print(f"{work.engine} node {n.node}: {n.steps} steps, {n.seconds:.1f} s", soft_wrap=True)
    if work.retried:
        stderr.print(f"[yellow]{work.retried} steps were run again after their worker was lost[/]")
    if work.resumed:
        stderr.print(f"resumed: {work.resumed} steps taken from {resumed_from}", soft_wrap=True)


def show_convert(summary: ConvertSummary) -> None:
    """One line saying what was written; with --dry-run, the table of old and new names first."""
    show_findings(summary.warnings)
    if summary.dry_run:
        title = f"dry run: convert to {summary.target_format} into {summary.output}"
        columns = [Column("module", "name"), Column(summary.target_format, "name"), *map(Column, ("rank", "alpha"))]
        rows = [[c.module.module, c.name, str(c.rank), f"{c.alpha:.6g}", f"{c.module.scale:.6g}"]
                for c in summary.modules]  # fmt: skip
        stderr.print(Fitted([*columns, Column("scale")], rows, title))
    for line in views.convert_lines(summary):
        stderr.print(line, soft_wrap=True)


def show_algebra(summary: AlgebraSummary) -> None:
    """The resize / combine table on stderr: per module the ranks, retained energy and relative error (and FedIT's
    with --report-naive), a total row, then what was written."""
    show_findings(summary.warnings)
    naive = any(m.naive is not None for m in summary.modules)
    columns = [Column("module", "name"), Column("old rank"), Column("new rank"), Column("retained")]
    columns += [Column("rel. error"), *([Column("FedIT error")] if naive else [])]
    rows = [
        [m.row.name, str(m.row.old_rank), str(m.row.new_rank), f"{m.row.retained:.4f}", f"{m.row.error:.4f}",
         *([] if not naive else ["n/a" if m.naive is None else f"{m.naive:.4f}"])]
        for m in summary.modules
    ]  # fmt: skip
    error = summary.total_error
    total = [f"total ({len(summary.modules)} modules)", "", "", f"{1 - error**2:.4f}", f"{error:.4f}"]
    how = f"{summary.method}, {summary.rule}" if summary.operation == "combine" else summary.rule
    stderr.print(Fitted(columns, rows, f"{summary.operation} ({how})", total=total + ([""] if naive else [])))
    stderr.print(
        f"{summary.operation}: wrote {summary.output} ({summary.target_format}, {len(summary.modules)} modules, "
        f"{summary.params:,} parameters, {size(summary.bytes_written)}, {summary.seconds:.1f} s)",
        soft_wrap=True,
    )
    if summary.work is not None and (summary.work.engine != "local" or summary.work.resumed):
        show_work(summary.work, summary.resumed_from)


def require_matplotlib() -> None:
    """Fail before any work when --plot is asked for and matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UnsupportedError(
            "--plot needs matplotlib, which is not installed; install it with pip install 'lorasurgeon[plot]'"
        )


def plot_extract(summary: ExtractSummary, path: Path) -> None:
    """Two panels to `path`: each matrix's singular values, and its relative error against rank."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    figure, (spectra, errors) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in summary.matrices:
        kept = itertools.accumulate(s * s / m.norm**2 for s in m.spectrum)
        ranks = range(1, len(m.spectrum) + 1)
        spectra.semilogy(ranks, m.spectrum, linewidth=0.8, alpha=0.6)
        errors.plot(ranks, [max(1 - k, 0.0) ** 0.5 for k in kept], linewidth=0.8, alpha=0.6)
    spectra.set(title="singular values of ΔW", xlabel="index", ylabel="σ")
    errors.set(title="‖ΔW − ΔW_r‖ / ‖ΔW‖", xlabel="rank r", ylabel="relative error", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
