"""The documents `--json` prints: one JSON object per command, each field named for what it holds (the report's
are described field by field in report.schema.json). Messages are in the command line's words. The documents of
the commands that write an adapter (extract, convert, resize, combine) are in adapter_documents.py.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from lorasurgeon.census import Count, per_layer
from lorasurgeon.errors import Finding
from lorasurgeon.report import SCHEMA_VERSION, CheckResult, ModuleReport, Report

if TYPE_CHECKING:  # not imported at run time: they load torch, which `report` does not need
    from lorasurgeon.cluster import WorkReport
    from lorasurgeon.expert_fit import ExpertCount
    from lorasurgeon.plan import Plan
    from lorasurgeon.surgery import SurgerySummary
    from lorasurgeon.verification import VerifySummary


def emit_json(doc: dict[str, Any]) -> None:
    """The one JSON document a `--json` command prints on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


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
            "kind": term.module.kind,
            "dora": term.dora,
            "bias": term.bias,
            "parameter": term.module.parameter,
            "expert": term.piece.expert if term.piece else None,
        }
        for step in plan.steps
        for term in step.terms
    ]
    modules += [  # other PEFT tuners: their own scalings are in their maths
        {
            "adapter": str(plan.adapters[term.adapter].path),
            "adapter_name": plan.adapters[term.adapter].path.name,
            "module": term.module.module,
            "adapter_key": term.module.first.name,
            "base_key": step.tensor.name,
            "shape": list(step.tensor.shape),
            "rank": None,
            "alpha": None,
            "scale": term.factor,
            "transposed": term.layer == "conv1d",
            "kind": term.module.tuner.lower(),
            "dora": False,
            "bias": term.param == "bias",
        }
        for step in plan.steps
        for term in step.tuners
    ]
    replaced = [  # tensors the adapter sets outright: modules_to_save, saved embeddings, biases, token rows
        {
            "adapter": str(plan.adapters[source.adapter].path),
            "adapter_key": source.tensor.name,
            "base_key": step.tensor.name,
            "rows": list(source.indices) if source.indices is not None else None,
        }
        for step in plan.steps
        for source in ((step.replacement,) if step.replacement else ()) + step.rows
    ]
    return {
        "ok": not plan.errors,
        "base": str(plan.base.path),
        "adapters": [
            {
                "path": str(a.path),
                "format": a.format,
                "modules": len(a.modules) + len(a.tuner_modules),
                "ignored_keys": list(a.ignored),
            }
            for a in plan.adapters
        ],
        "modules": modules,
        "replaced": replaced,
        "experts": [experts_doc(c) for c in plan.experts],
        "findings": [finding_doc(f) for f in plan.findings],
    }


def finite(value: float | None) -> float | None:
    """JSON has no NaN or Infinity: an undefined number (a figure of a weight whose ΔW is zero but whose stored
    values changed, say) is null."""
    return value if value is not None and math.isfinite(value) else None


def experts_doc(count: ExpertCount) -> dict[str, Any]:
    """The self-test of one MoE experts module (one per layer and fused parameter): every targeted expert
    touched, or the plan has an error."""
    return {
        "module": count.module,
        "parameter": count.parameter,
        "layout": count.layout,
        "experts_targeted": count.targeted,
        "experts_touched": count.placed,
        "tensors": count.tensors,
    }


def finding_doc(finding: Finding) -> dict[str, Any]:
    return {
        "severity": finding.severity,
        "message": finding.words("cli"),
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
        "experts": [experts_doc(c) for c in plan.experts],
        "quantization": plan.quantization.label if plan.quantization else None,
        "requantized": [
            {"tensor": f.tensor, "survival": finite(f.survival), "error": finite(f.error), "lost": f.lost}
            for f in summary.requantized
        ],
        "steps": [
            {
                "tensor": s.tensor.name,
                "shard": s.shard,
                "dtype": s.out_dtype,
                "adapters": [
                    str(plan.adapters[i].path) for i in [t.adapter for t in s.terms] + [t.adapter for t in s.tuners]
                ],
            }
            for s in plan.changed
        ],
    }


def report_doc(report: Report) -> dict[str, Any]:
    """The `report --json` document; every field is described in report.schema.json."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": report.kind,
        "path": report.path,
        "format": report.format,
        "ok": not report.fired,
        "totals": _count_doc(report.totals),
        "by_dtype": [{"dtype": c.name} | _count_doc(c) for c in report.by_dtype],
        "categories": [{"category": c.name} | _count_doc(c) for c in report.categories],
        "groups": [{"name": c.name, "repeat": c.repeat, "indices": c.indices} | _count_doc(c) for c in report.groups],
        "shards": [
            {
                "name": c.name,
                "file_bytes": c.bytes,
                "tensors": c.tensors,
                "parameters": c.parameters,
                "metadata": c.metadata,
            }
            for c in report.shards
        ],
        "metadata": report.metadata,
        "config": report.config,
        "adapter": _adapter_doc(report) if report.kind == "adapter" else None,
        "findings": [finding_doc(f) for f in report.findings],
        "check": _check_doc(report.check) if report.check else None,
        "stats": None if report.stats is None else [asdict(s) for s in report.stats],
        "fired": [{"rule": h.rule, "reason": h.reason} for h in report.fired],
        "tuner": asdict(report.tuner) if report.tuner else None,
    }


def _adapter_doc(report: Report) -> dict[str, Any]:
    lora, base = report.lora_parameters
    return {
        "lora_parameters": lora,
        "base_parameters": base,
        "reduction": 1 - lora / base if base else None,
        "targets": report.targets,
        "per_layer": per_layer((m.module, m.parameters) for m in report.modules if m.base_parameters),
        "modules": [_module_doc(m) for m in report.modules],
    }


def _check_doc(check: CheckResult) -> dict[str, Any]:
    return {
        "base": check.base,
        "ok": not any(f.severity == "error" for f in check.findings),
        "findings": [finding_doc(f) for f in check.findings],
        "touched_parameters": check.touched_parameters,
        "base_parameters": check.base_parameters,
        "touched_fraction": check.touched_parameters / check.base_parameters if check.base_parameters else 0.0,
    }


def _count_doc(c: Count) -> dict[str, int]:
    return {"tensors": c.tensors, "parameters": c.parameters, "bytes": c.bytes}


def _module_doc(m: ModuleReport) -> dict[str, Any]:
    doc = asdict(m)
    doc["base_shape"] = list(m.base_shape) if m.base_shape else None
    per_expert = m.parameters // m.experts if m.experts else None
    return doc | {"base_parameters": m.base_parameters, "reduction": m.reduction, "parameters_per_expert": per_expert}


def verify_doc(summary: VerifySummary) -> dict[str, Any]:
    """The `verify --json` document: the verdict of every tensor and companion file, and the problems."""
    counts: dict[str, int] = {}
    for t in summary.tensors:
        counts[t.kind] = counts.get(t.kind, 0) + 1
    return {
        "ok": summary.ok,
        "merged": summary.merged,
        "base": summary.base,
        "adapters": list(summary.adapters),
        "weights": list(summary.weights),
        "tolerance_ulps": summary.tolerance,
        "seconds": round(summary.seconds, 3),
        "counts": counts,
        "tensors": [
            {"name": t.name, "verdict": t.kind, "proven": t.proven, "adapters": list(t.adapters)}
            | ({k: v for k, v in asdict(t.verdict).items() if k != "kind"} if t.verdict is not None else {})
            for t in summary.tensors
        ],
        "files": [{"name": f.name, "verdict": f.kind, "detail": f.detail} for f in summary.files],
        "problems": [p.message for p in summary.problems],
        "work": work_doc(summary.work) if summary.work is not None else None,
        "resumed_from": summary.resumed_from,
    }


def work_doc(work: WorkReport) -> dict[str, Any]:
    """Where a command's per-step tasks ran (lorasurgeon.cluster): per node, retried after a lost worker, and
    taken from an interrupted run's journal instead of being computed."""
    return {
        "engine": work.engine,
        "address": work.address,
        "steps_run": work.steps,
        "retried": work.retried,
        "resumed": work.resumed,
        "nodes": [{"node": n.node, "steps": n.steps, "seconds": round(n.seconds, 3)} for n in work.nodes],
    }
