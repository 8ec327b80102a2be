"""The `--json` documents of the commands that write an adapter: extract (with where its tasks ran), convert,
resize and combine. Messages are in the command line's words (documents.py has the other commands' documents).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorasurgeon.documents import finding_doc, finite, work_doc

if TYPE_CHECKING:  # not imported at run time: they load torch
    from lorasurgeon.algebra import AlgebraSummary
    from lorasurgeon.conversion import ConvertSummary
    from lorasurgeon.extraction import ExtractSummary


def extract_doc(summary: ExtractSummary) -> dict[str, Any]:
    """The `extract --json` document: per matrix and in total, plus what was left out and why."""
    return {
        "base": summary.base,
        "tuned": summary.tuned,
        "output": summary.output,
        "dry_run": summary.dry_run,
        "device": summary.device,
        "seconds": round(summary.seconds, 3),
        "bytes_written": summary.bytes_written,
        "curve_ranks": list(summary.curve),
        "total": {
            "matrices": len(summary.matrices),
            "relative_error": summary.total_error,
            "captured_energy": 1.0 - summary.total_error**2,
            "adapter_params": summary.adapter_params,
            "replaced_params": summary.replaced_params,
            "curve": list(summary.curve_errors),
        },
        "matrices": [
            {
                "tensor": m.tensor,
                "module": m.module,
                "kind": m.kind,
                "shape": list(m.shape),
                "rank": m.rank,
                "method": m.method,
                "captured_energy": m.energy,
                "relative_error": m.error,
                "delta_norm": m.norm,
                "adapter_params": m.adapter_params,
                "curve": list(m.curve),
            }
            for m in summary.matrices
        ],
        "unchanged_targets": list(summary.unchanged),
        "saved_modules": list(summary.saved_modules),
        "changed_not_extracted": [
            {"tensor": c.name, "shape": list(c.shape), "max_abs_change": c.max_change} for c in summary.changed_other
        ],
        "warnings": [finding_doc(f) for f in summary.warnings],
        "adapter_config": summary.config,
        "folded": list(summary.folded),
        "work": work_doc(summary.work) if summary.work is not None else None,
        "resumed_from": summary.resumed_from,
    }


def convert_doc(summary: ConvertSummary) -> dict[str, Any]:
    """The `convert --json` document: each module's old and new name, rank, alpha and (unchanged) scale."""
    return {
        "adapter": summary.adapter,
        "from": summary.source.format,
        "to": summary.target_format,
        "output": summary.output,
        "dry_run": summary.dry_run,
        "seconds": round(summary.seconds, 3),
        "bytes_written": summary.bytes_written,
        "modules": [
            {
                "source": c.module.module,
                "target": c.name,
                "kind": c.module.kind,
                "rank": c.rank,
                "alpha": c.alpha,
                "scale": c.module.scale,
                "fold": c.factor,
            }
            for c in summary.modules
        ],
        "folded": list(summary.folded),
        "runtime": summary.runtime,
        "padded_rank": summary.rank,
        "added": list(summary.added),
        "carried": list(summary.carried),
        "left_out": list(summary.left_out),
        "warnings": [finding_doc(f) for f in summary.warnings],
        "config": summary.config,
        "metadata": summary.metadata,
    }


def algebra_doc(summary: AlgebraSummary) -> dict[str, Any]:
    """The `resize --json` / `combine --json` document: per module the ranks, retained energy and relative error
    (‖ΔW − ΔW′‖_F / ‖ΔW‖_F, exact from the spectrum), FedIT's error with --report-naive; null where undefined."""
    return {
        "operation": summary.operation,
        "adapters": [{"path": p, "weight": w} for p, w in zip(summary.adapters, summary.weights, strict=True)],
        "method": summary.method,
        "rule": summary.rule,
        "from": summary.source_format,
        "to": summary.target_format,
        "output": summary.output,
        "device": summary.device,
        "seconds": round(summary.seconds, 3),
        "bytes_written": summary.bytes_written,
        "total": {
            "modules": len(summary.modules),
            "relative_error": summary.total_error,
            "retained_energy": 1.0 - summary.total_error**2,
            "params": summary.params,
        },
        "modules": [
            {
                "module": m.row.name,
                "old_rank": m.row.old_rank,
                "new_rank": m.row.new_rank,
                "retained_energy": m.row.retained,
                "relative_error": m.row.error,
                "delta_norm": finite(m.norm),
                "params": m.params,
                "naive_relative_error": finite(m.naive),
            }
            for m in summary.modules
        ],
        "full_tensors": list(summary.full),
        "warnings": [finding_doc(f) for f in summary.warnings],
        "config": summary.config,
        "work": work_doc(summary.work) if summary.work is not None else None,
        "resumed_from": summary.resumed_from,
    }
