"""Everything people and machines read: rich tables and progress on stderr, one JSON document on stdout."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lorasurgeon.plan import Finding, Plan
from lorasurgeon.surgery import Progress as SurgeryProgress
from lorasurgeon.surgery import SurgerySummary

# Wide when piped (CI logs, README examples), so tensor names are not cut.
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def emit_json(doc: dict[str, Any]) -> None:
    """The one JSON document a `--json` command prints on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable[[SurgeryProgress], None] | None]:
    """A progress callback drawing tensors and bytes on a terminal; None (silent) when stderr is piped."""
    if not stderr.is_terminal:
        yield None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(p: SurgeryProgress) -> None:
            bar.update(task, total=p.bytes_total, completed=p.bytes_done, description=f"{label} {p.tensors_done}")

        yield update


def plan_doc(plan: Plan) -> dict[str, Any]:
    modules = [
        {
            "adapter": str(plan.adapters[term.adapter].path),
            "adapter_name": plan.adapters[term.adapter].path.name,
            "module": term.module.module,
            "adapter_key": term.module.a.name.removesuffix(".lora_A.weight"),
            "base_key": step.tensor.name,
            "shape": list(step.tensor.shape),
            "rank": term.module.rank,
            "alpha": term.module.alpha,
            "scale": term.module.scale,
            "transposed": term.transpose,
        }
        for step in plan.steps
        for term in step.terms
    ]
    return {
        "ok": not plan.errors,
        "base": str(plan.base.path),
        "adapters": [
            {"path": str(a.path), "format": a.format, "modules": len(a.modules), "ignored_keys": list(a.ignored)}
            for a in plan.adapters
        ],
        "modules": modules,
        "findings": [finding_doc(f) for f in plan.findings],
    }


def finding_doc(finding: Finding) -> dict[str, Any]:
    return {
        "severity": finding.severity,
        "message": finding.message,
        "adapter_key": finding.adapter_key,
        "base_key": finding.base_key,
    }


def summary_doc(summary: SurgerySummary) -> dict[str, Any]:
    plan = summary.plan
    return {
        "operation": summary.operation,
        "output": summary.output,
        "dry_run": summary.dry_run,
        "device": summary.device,
        "tensors": summary.tensors,
        "changed": summary.changed,
        "bytes_written": summary.bytes_written,
        "seconds": round(summary.seconds, 3),
        "copied_files": list(summary.copied_files),
        "skipped_files": list(summary.skipped_files),
        "removed_temporaries": list(summary.removed_temporaries),
        "warnings": [finding_doc(f) for f in plan.warnings],
        "steps": [
            {
                "tensor": s.tensor.name,
                "shard": s.shard,
                "dtype": s.out_dtype,
                "adapters": [str(plan.adapters[t.adapter].path) for t in s.terms],
            }
            for s in plan.changed
        ],
    }


def show_check(plan: Plan) -> None:
    """The check table: one row per adapted module, then the findings."""
    table = Table(title=f"{plan.base.path}: {len(plan.base.tensors)} tensors", title_justify="left")
    for column in ("adapter", "base tensor", "shape", "rank", "alpha", "scale"):
        table.add_column(column, justify="right" if column in ("rank", "alpha", "scale") else "left")
    doc = plan_doc(plan)
    for row in doc["modules"]:
        transposed = " (T)" if row["transposed"] else ""
        shape = "x".join(map(str, row["shape"])) + transposed
        table.add_row(
            row["adapter"], row["base_key"], shape, str(row["rank"]), f"{row['alpha']:g}", f"{row['scale']:.4g}"
        )
    stderr.print(table)
    show_findings(plan.findings)
    verdict = "[green]fits[/]" if not plan.errors else f"[red]does not fit[/] ({len(plan.errors)} problems)"
    stderr.print(f"{len(doc['modules'])} modules checked: the adapter {verdict}")


def show_findings(findings: tuple[Finding, ...] | list[Finding]) -> None:
    for f in findings:
        colour = "red" if f.severity == "error" else "yellow"
        stderr.print(f"[{colour}]{f.severity}:[/] {f.message}", soft_wrap=True)


def show_summary(summary: SurgerySummary) -> None:
    show_findings(summary.plan.warnings)
    if summary.dry_run:
        show_plan(summary)
        return
    stderr.print(
        f"{summary.operation}: wrote {summary.output} ({summary.changed} of {summary.tensors} tensors changed, "
        f"{summary.bytes_written / 1e6:.1f} MB, {summary.seconds:.1f} s on {summary.device})",
        soft_wrap=True,
    )
    for path in summary.removed_temporaries:
        stderr.print(f"removed {path}, left by an interrupted run", soft_wrap=True)
    for name in summary.skipped_files:
        stderr.print(f"[yellow]skipped[/] {name}: weights in another file format would contradict the merged ones")


def show_plan(summary: SurgerySummary) -> None:
    table = Table(title=f"dry run: {summary.operation} into {summary.output} (nothing written)", title_justify="left")
    for column in ("shard", "tensor", "dtype", "adapters"):
        table.add_column(column)
    for row in summary_doc(summary)["steps"]:
        table.add_row(row["shard"], row["tensor"], row["dtype"], ", ".join(row["adapters"]))
    stderr.print(table)
    stderr.print(f"{summary.changed} of {summary.tensors} tensors would change; the rest are copied byte for byte")
