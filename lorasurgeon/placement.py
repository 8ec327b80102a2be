"""Placement: each LoRA module of the adapters resolved onto the base tensor it changes (its `Term`s), and the
tensors an adapter sets outright (`Source`s: modules_to_save, saved embeddings, biases, trainable-token rows), by
tensor name, with the findings against them. The plan (plan.py) gathers them into its steps; names are resolved by
lorasurgeon.formats, fits checked by lorasurgeon.fit and lorasurgeon.expert_fit. Headers only, torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.errors import Finding
from lorasurgeon.expert_fit import place_experts
from lorasurgeon.fit import bias_target, place, source_problem
from lorasurgeon.formats.moe import ExpertSlice
from lorasurgeon.formats.resolution import BaseNames
from lorasurgeon.header import TensorInfo
from lorasurgeon.tuner_placement import TunerTerm


@dataclass(frozen=True)
class Term:
    """One adapter module's contribution to a step: factor · (B @ A), transposed for (in, out) weights.

    With `bias`, the step is the module's bias vector and the term adds factor · lora_B.bias to it. A module
    with a DoRA magnitude rescales the step's sum (the plan lets no other term share such a step). With `rows`
    (start, stop), ΔW changes only those rows of the step's tensor (q, k or v of a fused OpenCLIP in_proj_weight).
    `shape` is the changed tensor's (or rows'), in which a LyCORIS ΔW (rebuilt from flattened factors) is laid out.
    An "experts" module's term has `piece`: the expert (and its rows) the tensor takes, or the whole fused delta.
    """

    adapter: int
    module: LoraModule
    factor: float
    transpose: bool
    bias: bool = False
    rows: tuple[int, int] | None = None
    shape: tuple[int, ...] = ()
    piece: ExpertSlice | None = None

    @property
    def dora(self) -> bool:
        return self.module.magnitude is not None and not self.bias


@dataclass(frozen=True)
class Source:
    """An adapter tensor whose values are written outright: the whole tensor, or the rows `indices` of it."""

    adapter: int
    tensor: TensorInfo
    indices: tuple[int, ...] | None = None
    saved_base: bool = False  # PEFT's saved copy of the base weight (Replacement.saved_base)


@dataclass
class Targets:
    """What the adapters do to each tensor name, gathered while planning (mutable only while plan_surgery runs)."""

    tensors: Mapping[str, TensorInfo]
    names: BaseNames
    terms: dict[str, list[Term]]
    sources: dict[str, list[Source]]
    findings: list[Finding]
    tuners: dict[str, list[TunerTerm]] = field(default_factory=dict)


def add_module(
    found: Targets,
    index: int,
    adapter: Adapter,
    module: LoraModule,
    weight: float,
    model_type: str | None,
    allow_nonfinite: bool,
) -> None:
    """Resolve one module's weight (and lora_B bias) target and record its terms, or the findings against it."""
    if module.kind == "experts":
        _add_experts(found, index, adapter, module, weight, allow_nonfinite)
        return
    target, problems = place(found.names, adapter, module, model_type, allow_nonfinite)
    found.findings += problems
    if target is None or any(p.severity == "error" for p in problems):
        return
    info, transpose, module, rows = target
    if any(t.adapter == index and _overlap(t.rows, rows) for t in found.terms.get(info.name, [])):
        found.findings.append(
            Finding.against(module.a.name, info.name, "a second module of the adapter changes it too")
        )
        return
    shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
    term = Term(index, module, weight * module.scale, transpose, rows=rows, shape=shape)
    found.terms.setdefault(info.name, []).append(term)
    if module.bias is not None:
        bias, problem = bias_target(found.names, module.module, module.bias)
        if bias is None:
            found.findings.append(Finding.against(module.bias.name, info.name, problem))
        else:
            found.terms.setdefault(bias.name, []).append(Term(index, module, weight * module.scale, False, True))


def _add_experts(
    found: Targets, index: int, adapter: Adapter, module: LoraModule, weight: float, allow_nonfinite: bool
) -> None:
    """An experts module's terms: one per base tensor that takes a piece of its delta (lorasurgeon.expert_fit)."""
    placements, problems = place_experts(found.names, adapter, module, allow_nonfinite)
    found.findings += problems
    for placed in placements:
        if any(t.adapter == index for t in found.terms.get(placed.tensor.name, [])):
            problem = "a second module of the adapter changes it too"
            found.findings.append(Finding.against(module.a.name, placed.tensor.name, problem))
            return
        shape, piece = placed.tensor.shape, placed.piece
        term = Term(index, module, weight * module.scale, placed.transpose, shape=shape, piece=piece)
        found.terms.setdefault(placed.tensor.name, []).append(term)


def _overlap(rows: tuple[int, int] | None, other: tuple[int, int] | None) -> bool:
    """Whether two terms change common rows of one tensor (None: all of them)."""
    return rows is None or other is None or (rows[0] < other[1] and other[0] < rows[1])


def add_sources(found: Targets, index: int, adapter: Adapter) -> None:
    """Record the adapter's replacement tensors and trainable-token rows against the base tensors they set."""
    wanted: list[tuple[str, str, TensorInfo, tuple[int, ...] | None, bool]]
    wanted = [(r.module, r.param, r.tensor, None, r.saved_base) for r in adapter.replacements]
    wanted += [(t.module, "weight", t.tensor, t.indices, False) for t in adapter.token_rows]
    for module, param, tensor, indices, saved_base in wanted:
        names = found.names.named(module, param)
        if not names:
            missing = f"it sets {module}.{param}, which is not in the base"
            found.findings.append(Finding.against(tensor.name, None, missing))
            continue
        info = found.tensors[names[0]]
        problem = source_problem(info, tensor, indices)
        if problem:
            found.findings.append(Finding.against(tensor.name, info.name, problem))
        else:
            found.sources.setdefault(info.name, []).append(Source(index, tensor, indices, saved_base))
    found.findings += _unsaved(found, index, adapter)


def _unsaved(found: Targets, index: int, adapter: Adapter) -> list[Finding]:
    """modules_to_save parameters the file lacks: PEFT >= 0.15 fails to load such an adapter (FORMATS.md §4.3).

    PEFT wraps every module whose path ends with an entry (a plain string suffix, no dot boundary).
    """
    set_here = {name for name, sources in found.sources.items() if any(s.adapter == index for s in sources)}
    problem = "it is in modules_to_save but the adapter holds no tensor for it, so PEFT cannot load the adapter"
    return [
        Finding.against(str(adapter.path), name, problem)
        for name in found.tensors
        if name not in set_here and any(name.rpartition(".")[0].endswith(e) for e in adapter.saved_modules)
    ]


def ignored(key: str) -> Finding:
    problem = "its module is not selected by the adapter config, so PEFT ignores it and so does lorasurgeon"
    return Finding.against(key, None, problem, severity="warning")
