"""Report: what a checkpoint or an adapter holds, from its headers (and, with stats, its tensors), as dataclasses.

Header-only by default: names, dtypes, shapes and metadata. An adapter is read by the same reader as the merge
(lorasurgeon.formats.load_adapter), leniently: what the merge would refuse is described and said in findings
(FORMATS.md §8 gives the parameter rules: every stored tensor counts in full, except kohya `.alpha` scalars).
`--fail-on` rules live in rules.py, rendering in render.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorasurgeon import lycoris
from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.census import Count, census, groups
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding, InputError, LorasurgeonError, MismatchError, Option, UnsupportedError
from lorasurgeon.formats import detect, load_adapter
from lorasurgeon.formats.peft_config import ADAPTER_CONFIG
from lorasurgeon.header import TensorInfo
from lorasurgeon.progress import Progress
from lorasurgeon.tuner_report import TunerReport, describe, tuner_config

if TYPE_CHECKING:
    from lorasurgeon.rules import Hit

SCHEMA_VERSION = "1"
CONFIG_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
# Role names the report shows: one vocabulary for every format (kohya's down/up are PEFT's A/B).
ROLE_NAMES = {"lora_down": "lora_A", "lora_up": "lora_B", "dora_scale": "lora_magnitude_vector"}


@dataclass(frozen=True)
class TensorStats:
    name: str
    dtype: str
    nan: int
    inf: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None


@dataclass(frozen=True)
class ModuleReport:
    """One adapted module: its tensors' roles, rank/alpha/scale, parameters and the base matrix it changes."""

    module: str
    kind: str  # "linear" | "conv" | "embedding" | "replacement" | "tokens" | "unpaired" | a LyCORIS or PEFT tuner
    tensors: dict[str, str]  # role (lora_A, lora_B, lora_magnitude_vector, replacement:weight, ...) -> key
    dtype: str
    parameters: int
    rank: int | None = None
    alpha: float | None = None
    scale: float | None = None
    base_shape: tuple[int, ...] | None = None
    delta_norm: float | None = None  # stats: ‖scale·BA‖_F (null when the scale is unknown)
    delta_spectral_norm: float | None = None
    stable_rank: float | None = None

    @property
    def base_parameters(self) -> int | None:
        return math.prod(self.base_shape) if self.base_shape else None

    @property
    def reduction(self) -> float | None:
        """1 − LoRA parameters / base matrix parameters (1024×1024 at r=8: 1 − 16,384/1,048,576 = 98.44 %)."""
        base = self.base_parameters
        return 1 - self.parameters / base if base else None


@dataclass(frozen=True)
class CheckResult:
    base: str
    findings: tuple[Finding, ...]
    touched_parameters: int
    base_parameters: int


@dataclass(frozen=True)
class Report:
    """Everything `lorasurgeon report` says about PATH; `fired` lists the fail_on rules that hold."""

    kind: Literal["checkpoint", "adapter"]
    path: str
    format: str  # checkpoint: file | index | dir; adapter: peft | kohya | diffusers
    totals: Count
    by_dtype: tuple[Count, ...]
    categories: tuple[Count, ...]
    groups: tuple[Count, ...]
    shards: tuple[Count, ...]
    metadata: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    modules: tuple[ModuleReport, ...] = ()
    findings: tuple[Finding, ...] = ()
    check: CheckResult | None = None
    stats: tuple[TensorStats, ...] | None = None
    fired: tuple[Hit, ...] = ()
    tuner: TunerReport | None = None  # a PEFT tuner other than LoRA: what it is, and what lorasurgeon does with it

    @property
    def lora_parameters(self) -> tuple[int, int]:
        """(parameters of the LoRA factors, parameters of the base matrices they adapt)."""
        paired = [m for m in self.modules if m.base_parameters]
        return sum(m.parameters for m in paired), sum(m.base_parameters or 0 for m in paired)

    @property
    def targets(self) -> dict[str, int]:
        """Module name (last path component) -> how many matrices of that name the adapter changes."""
        out: dict[str, int] = {}
        for m in self.modules:
            out[m.module.rpartition(".")[2]] = out.get(m.module.rpartition(".")[2], 0) + 1
        return dict(sorted(out.items()))


def make_report(
    path: Path,
    base: Path | None = None,
    stats: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> Report:
    """Describe `path` (a checkpoint in any layout, or an adapter); see the module docstring. The data pass
    runs with `stats`."""
    found = detect(path)
    if found == "checkpoint":
        if base is not None:
            raise LorasurgeonError(
                f"{path}: is a checkpoint, not an adapter; ", Option("base"), " is only for adapters"
            )
        with Checkpoint.open(path) as ckpt:
            report = _checkpoint_report(path, ckpt)
            return _with_stats(report, ckpt, on_progress) if stats else report
    adapter = load_adapter(path, strict=False)
    with adapter.source:
        report = _adapter_report(path, adapter, found)
        if base is not None:
            report = replace(report, check=_check(path, base))
        return _with_stats(report, adapter.source, on_progress) if stats else report


def _checkpoint_report(path: Path, ckpt: Checkpoint) -> Report:
    infos = list(ckpt)
    counted = census(ckpt, infos)
    config = {"model_type": ckpt.config.get("model_type")} if ckpt.config else {}
    return Report(
        "checkpoint", str(path), ckpt.layout, counted.totals, counted.by_dtype, counted.categories, groups(infos),
        counted.shards, counted.metadata, config=config,
    )  # fmt: skip


def _adapter_report(path: Path, adapter: Adapter, fmt: str) -> Report:
    scalars = set(adapter.scalars)
    counted = census(adapter.source, [t for t in adapter.source if t.name not in scalars])
    modules = _modules(adapter)
    findings = list(adapter.problems)
    findings += [
        Finding.of(
            "error", f"{adapter.source.path}: {m.module} has rank {m.a.shape[0]} but {ADAPTER_CONFIG} says {m.rank}"
        )
        for m in (*adapter.modules, *adapter.unselected)
        if not m.factors and adapter.rank_source == ADAPTER_CONFIG and m.a.shape[0] != m.rank
    ]
    has_config = bool(adapter.config) or adapter.rank_source == ADAPTER_CONFIG
    config = {name: adapter.config[name] for name in CONFIG_FIELDS if name in adapter.config}
    config = tuner_config(adapter) if adapter.tuner else config
    return Report(
        "adapter", str(path), fmt, counted.totals, counted.by_dtype, counted.categories, (),
        counted.shards, counted.metadata, config=config | {"has_config": has_config}, modules=modules,
        findings=tuple(findings), tuner=describe(adapter),
    )  # fmt: skip


def _modules(adapter: Adapter) -> tuple[ModuleReport, ...]:
    """One ModuleReport per module name: its LoRA (or LyCORIS) factors, the tensors that replace base tensors of
    the same module, its trainable-token rows, and whatever the merge refuses, each with its role."""
    described: dict[str, ModuleReport] = {}

    def add(module: str, kind: str, tensors: Mapping[str, TensorInfo], **known: Any) -> None:
        roles = {ROLE_NAMES.get(r, r): t for r, t in tensors.items()}
        if not roles:
            return
        first = next(iter(roles.values()))
        row = ModuleReport(module, kind, {}, first.dtype, 0, **known)
        old = described.get(module)
        if old is not None:  # a replacement of a LoRA module's other parameter (its bias): one row, LoRA's kind
            row = old if old.kind != "replacement" else replace(row, tensors=old.tensors, parameters=old.parameters)
        names = {**row.tensors, **{r: t.name for r, t in roles.items()}}
        numel = row.parameters + sum(t.numel for t in roles.values())
        described[module] = replace(row, tensors=dict(sorted(names.items())), parameters=numel)

    for m in (*adapter.modules, *adapter.unselected):
        add(m.module, m.kind, _roles(m), **_shape_and_scale(adapter, m))
    for r in adapter.replacements:
        add(r.module, "replacement", {f"replacement:{r.param}": r.tensor})
    for rows in adapter.token_rows:
        add(rows.module, "tokens", {"trainable_tokens_delta": rows.tensor})
    for t in (*adapter.tuner_modules, *adapter.tuner_unselected):  # another PEFT tuner: its own roles, its rank
        add(t.module, t.tuner.lower(), t.factors, rank=t.params.get("rank"))
    for role, info in adapter.shared.items():  # tensors every module of the tuner reads (VeRA's projections)
        add(role, "shared", {role: info})
    for refused in adapter.refused:
        add(refused.module, refused.kind, refused.tensors)
    return tuple(described[name] for name in sorted(described))


def _roles(m: LoraModule) -> dict[str, TensorInfo]:
    if m.factors:
        roles = dict(m.factors)
    else:
        prefix = "lora_embedding_" if m.kind == "embedding" else "lora_"
        roles = {f"{prefix}A": m.a, f"{prefix}B": m.b}
    if m.magnitude is not None:
        roles["lora_magnitude_vector"] = m.magnitude
    if m.bias is not None:
        roles["lora_B_bias"] = m.bias
    return roles


def _shape_and_scale(adapter: Adapter, m: LoraModule) -> dict[str, Any]:
    """rank, alpha, scale (None when nothing says it) and the shape of the base matrix the module changes."""
    known = {"alpha": m.alpha, "scale": m.scale} if adapter.scale_known else {}
    if m.factors:  # LyCORIS: the shapes the merge computes ΔW in; a misfit (named by check) has none
        fit = lycoris.layout(m.kind, {role: f.shape for role, f in m.factors.items()})
        return {} if fit.problem else {"rank": m.rank, "base_shape": fit.shape, **known}
    a, b = m.a.shape, m.b.shape
    shape = (a[1], b[0]) if m.kind == "embedding" else (b[0], *a[1:])  # embedding (V, d); weight (out, in, *k)
    return {"rank": a[0], "base_shape": shape, **known}


def _check(path: Path, base_path: Path) -> CheckResult:
    """What `check` finds, and how many base parameters the adapter changes or replaces: the base tensors the
    merge would write anew, found by the merge's own name resolution (PEFT, kohya, diffusers alike)."""
    # Imported here: the plan reads factor values, which needs torch; a header-only report does without it.
    from lorasurgeon.plan import plan_surgery

    with Checkpoint.open(base_path) as base:
        touched: set[str] = set()
        try:
            adapter = load_adapter(path, scan_values=True)
        except (InputError, UnsupportedError, MismatchError) as e:  # described above; the merge refuses it
            findings: tuple[Finding, ...] = (Finding("error", e.parts),)
        else:
            with adapter.source:
                plan = plan_surgery("merge", base, [adapter], [1.0])
            findings = plan.findings
            touched = {s.tensor.name for s in plan.changed if s.tensor.name in base.tensors}
        total = sum(t.numel for t in base.tensors.values())
        return CheckResult(str(base_path), findings, sum(base.tensors[n].numel for n in touched), total)


def _with_stats(report: Report, ckpt: Checkpoint, on_progress: Callable[[Progress], None] | None) -> Report:
    """One pass over the tensor data, one tensor at a time: per-tensor statistics, then per-module ΔW norms."""
    from lorasurgeon import linalg

    infos = list(ckpt)
    total = sum(t.nbytes for t in infos)
    stats, done = [], 0
    for i, info in enumerate(infos, 1):
        stats.append(TensorStats(info.name, info.dtype, *linalg.tensor_stats(ckpt.read(info))))
        done += info.nbytes
        if on_progress:
            on_progress(Progress(i, len(infos), done, total, "reading"))
    modules = tuple(_delta_norms(ckpt, m) for m in report.modules)
    return replace(report, stats=tuple(stats), modules=modules)


def _delta_norms(ckpt: Checkpoint, m: ModuleReport) -> ModuleReport:
    from lorasurgeon import linalg

    if m.rank is None or m.base_shape is None:
        return m
    if m.kind in lycoris.ALGORITHMS:
        renamed = {v: k for k, v in ROLE_NAMES.items()}
        factors = {renamed.get(r, r): ckpt.read(ckpt.tensors[k]) for r, k in m.tensors.items()}
        factors.pop("dora_scale", None)
        if any(linalg.nonfinite_count(f) for f in factors.values()):
            return m
        fro, spectral, stable = lycoris.delta_norms(lycoris.delta(m.kind, factors, 1.0, m.base_shape))
    else:
        prefix = "lora_embedding_" if m.kind == "embedding" else "lora_"
        a_info, b_info = ckpt.tensors[m.tensors[prefix + "A"]], ckpt.tensors[m.tensors[prefix + "B"]]
        if a_info.shape[0] != b_info.shape[1]:  # ranks that disagree give no product (check says so)
            return m
        a, b = ckpt.read(a_info), ckpt.read(b_info)
        if linalg.nonfinite_count(a) or linalg.nonfinite_count(b):
            return m  # the NaN/Inf are counted in the tensor statistics; a norm of them means nothing
        fro, spectral, stable = linalg.lora_delta_norms(a, b)
    scale = abs(m.scale) if m.scale is not None else None
    return replace(
        m,
        delta_norm=None if scale is None else scale * fro,
        delta_spectral_norm=None if scale is None else scale * spectral,
        stable_rank=stable,
    )
