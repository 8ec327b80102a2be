"""Plan: from headers (and the small factor tensors) to a flat list of per-tensor steps plus findings.

`check` and `--dry-run` are this module and nothing more. A step says which base tensor is written, in
which dtype, and which adapter terms are added to it; steps are in shard and file order, so the surgery
reads each base file front to back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorasurgeon import keys, linalg
from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.header import TensorInfo


@dataclass(frozen=True)
class Finding:
    """Something `check` found: an error stops merge/unmerge, a warning is reported."""

    severity: str  # "error" | "warning"
    message: str
    adapter_key: str | None = None
    base_key: str | None = None


@dataclass(frozen=True)
class Term:
    """One adapter module's contribution to a step: factor · (B @ A), transposed for (in, out) weights."""

    adapter: int
    module: LoraModule
    factor: float
    transpose: bool


@dataclass(frozen=True)
class Step:
    """Write `tensor` to output shard `shard` as `out_dtype`, adding `terms` (none: copy it unchanged)."""

    tensor: TensorInfo
    shard: str
    out_dtype: str
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class Plan:
    operation: str  # "merge" | "unmerge"
    base: Checkpoint
    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    steps: tuple[Step, ...]
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def changed(self) -> list[Step]:
        return [s for s in self.steps if s.terms or s.out_dtype != s.tensor.dtype]


def plan_surgery(
    operation: str,
    base: Checkpoint,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    scale: float = 1.0,
    dtype: str | None = None,
) -> Plan:
    """Resolve every adapter module onto one base tensor and check that it fits (FORMATS.md §1.5, §2.2).

    `weights[i] * scale` multiplies adapter i's own LoRA scale; `dtype` (a safetensors dtype name)
    converts every floating-point tensor, None keeps each tensor's dtype.
    """
    findings: list[Finding] = []
    terms: dict[str, list[Term]] = {}
    model_type = (base.config or {}).get("model_type")
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        findings += [_ignored(adapter, key) for key in adapter.ignored]
        if not adapter.modules:
            findings.append(Finding("error", f"{adapter.path}: the adapter selects no module to change"))
        for module in adapter.modules:
            target, problems = _resolve(base, adapter, module, model_type)
            findings += problems
            if target is None or any(p.severity == "error" for p in problems):
                continue
            info, transpose = target
            if any(t.adapter == index for t in terms.get(info.name, [])):
                findings.append(_error(module.a.name, info.name, "a second module of the adapter changes it too"))
                continue
            terms.setdefault(info.name, []).append(Term(index, module, weight * scale * module.scale, transpose))
    steps = tuple(
        Step(info, shard.name, dtype if dtype and info.is_float else info.dtype, tuple(terms.get(info.name, ())))
        for shard in base.shards
        for info in shard.header.tensors
    )
    return Plan(operation, base, tuple(adapters), tuple(weights), steps, tuple(findings))


def _error(adapter_key: str, base_key: str | None, problem: str) -> Finding:
    where = f"{adapter_key} -> {base_key}" if base_key else adapter_key
    return Finding("error", f"{where}: {problem}", adapter_key, base_key)


def _ignored(adapter: Adapter, key: str) -> Finding:
    return Finding(
        "warning",
        f"{key}: its module is not selected by the adapter config, so PEFT ignores it and so does lorasurgeon",
        key,
    )


def _resolve(
    base: Checkpoint, adapter: Adapter, module: LoraModule, model_type: str | None
) -> tuple[tuple[TensorInfo, bool] | None, list[Finding]]:
    """The base tensor `module` changes and whether its delta is transposed, or the findings against it."""
    candidates = [c for c in keys.tensor_candidates(module.module, "weight") if c in base.tensors]
    if not candidates:
        return None, [_error(module.a.name, None, f"target {module.target} is not in the base checkpoint")]
    if len(candidates) > 1:
        return None, [_error(module.a.name, None, f"target is ambiguous: {' and '.join(candidates)} both exist")]
    info = base.tensors[candidates[0]]
    problems = _factor_findings(adapter, module, info)
    if problems:
        return None, problems
    transpose, problem = _orientation(module, info, model_type)
    if problem:
        return None, [_error(module.a.name, info.name, problem)]
    return (info, transpose), _nonfinite_findings(adapter, module, info)


def _factor_findings(adapter: Adapter, module: LoraModule, info: TensorInfo) -> list[Finding]:
    a, b = module.a, module.b
    problems = []
    for factor in (a, b):
        if not factor.is_float:
            problems.append(_error(factor.name, info.name, f"dtype {factor.dtype} is not floating point"))
    if not info.is_float:
        problems.append(_error(a.name, info.name, f"base tensor has dtype {info.dtype}, not floating point"))
    if len(info.shape) != 2:
        problems.append(_error(a.name, info.name, f"base tensor has shape {list(info.shape)}, not a matrix"))
    if a.shape[0] != b.shape[1]:
        problems.append(_error(b.name, info.name, f"lora_B has rank {b.shape[1]} but lora_A has rank {a.shape[0]}"))
    elif a.shape[0] != module.rank:
        source = "adapter_config.json" if adapter.config else "the command line"
        problems.append(_error(a.name, info.name, f"has rank {a.shape[0]} but {source} says {module.rank}"))
    return problems


def _orientation(module: LoraModule, info: TensorInfo, model_type: str | None) -> tuple[bool, str | None]:
    """Whether ΔW is transposed to fit W (FORMATS.md §2.2): by architecture when known, else by shape."""
    out_features, in_features = module.b.shape[0], module.a.shape[1]
    if model_type is not None:
        transpose = keys.is_conv1d(model_type, module.module)
    elif out_features != in_features:
        transpose = info.shape == (in_features, out_features)
    else:
        transpose = module.fan_in_fan_out
    want = (in_features, out_features) if transpose else (out_features, in_features)
    if info.shape != want:
        layout = "(in, out) as a Conv1D" if transpose else "(out, in)"
        return (
            transpose,
            f"B @ A is {out_features}x{in_features}, which does not fit the base shape "
            f"{list(info.shape)} stored {layout}",
        )
    return transpose, None


def _nonfinite_findings(adapter: Adapter, module: LoraModule, info: TensorInfo) -> list[Finding]:
    problems = []
    for factor in (module.a, module.b):
        bad = linalg.nonfinite_count(adapter.source.read(factor))
        if bad:
            problems.append(_error(factor.name, info.name, f"holds {bad} NaN/Inf values"))
    return problems
