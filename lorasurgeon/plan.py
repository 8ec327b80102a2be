"""Plan: from headers (and the small factor tensors) to a flat list of per-tensor steps plus findings.

`check` and `--dry-run` are this module and nothing more. A step says which base tensor is written, in
which dtype, where its starting value comes from (the base, or an adapter's replacement tensor), and which
adapter terms are added to it; steps are in shard and file order, so the surgery reads each base file front
to back.

Replacement tensors (modules_to_save, saved embeddings, bias="all"/"lora_only", trainable-token rows) take
the base tensor's place: the output keeps the base tensor's name, shape and dtype (or --dtype), and the
adapter's values are rounded once into it; a shape that differs from the base's is an error. PEFT's saved copy
of a base weight under a LoRA (save_embedding_layers) is where merge starts, and what unmerge must give back. Tied
weights follow lorasurgeon.ties (FORMATS.md §4.1): the output computes what PEFT's forward does.
Names are resolved by lorasurgeon.formats (kohya names by sd-scripts' forward rule, never inverted), fits are
checked by lorasurgeon.fit; the modules of other PEFT tuners (IA3, OFT, VeRA, ...) are placed by
lorasurgeon.tuner_placement. The plan reads headers only: the factors' NaN/Inf counts come with the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lorasurgeon.adapter import Adapter, LoraModule, repeated
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding
from lorasurgeon.fit import place
from lorasurgeon.formats.architectures import quantized_findings, tensor_candidates
from lorasurgeon.formats.resolution import BaseNames
from lorasurgeon.header import TensorInfo
from lorasurgeon.model_config import output_config
from lorasurgeon.ties import Ties, Untie, followers, share, tied_weights, untie
from lorasurgeon.tuner_placement import TunerTerm, combination_findings, place_tuners

Operation = Literal["merge", "unmerge"]

DORA_UNMERGE = (
    "it is a DoRA module: the merged weight W' = (m/‖W+ΔW‖)·(W+ΔW) has every output row of norm m, so the "
    "per-row norms of the original W are gone and W cannot be recovered from the merged checkpoint"
)


@dataclass(frozen=True)
class Term:
    """One adapter module's contribution to a step: factor · (B @ A), transposed for (in, out) weights.

    With `bias`, the step is the module's bias vector and the term adds factor · lora_B.bias to it. A module
    with a DoRA magnitude rescales the step's sum (the plan lets no other term share such a step). With `rows`
    (start, stop), ΔW changes only those rows of the step's tensor (q, k or v of a fused OpenCLIP in_proj_weight).
    `shape` is the changed tensor's (or rows'), in which a LyCORIS ΔW (rebuilt from flattened factors) is laid out.
    """

    adapter: int
    module: LoraModule
    factor: float
    transpose: bool
    bias: bool = False
    rows: tuple[int, int] | None = None
    shape: tuple[int, ...] = ()

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


@dataclass(frozen=True)
class Step:
    """Write `tensor` to output shard `shard` as `out_dtype`: its base value, or `replacement`'s, with `rows`
    set, plus `terms` and the `tuners`' changes (nothing at all: copy it unchanged). A `tensor` whose name the base
    lacks is an alias of a base tensor's bytes under a new name (an untied head). `expected`: what an unmerge must
    give back, up to rounding (PEFT's saved copy of the base weight)."""

    tensor: TensorInfo
    shard: str
    out_dtype: str
    terms: tuple[Term, ...]
    replacement: Source | None = None
    rows: tuple[Source, ...] = ()
    expected: Source | None = None
    tuners: tuple[TunerTerm, ...] = ()

    @property
    def touched(self) -> bool:
        return bool(self.terms or self.replacement or self.rows or self.tuners)


@dataclass(frozen=True)
class Plan:
    operation: Operation
    base: Checkpoint
    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    steps: tuple[Step, ...]
    findings: tuple[Finding, ...]
    allow_nonfinite: bool = False  # NaN/Inf in inputs: warnings instead of errors
    config: dict[str, Any] | None = None  # the output config.json, when it must differ from the base's

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def changed(self) -> list[Step]:
        return [
            s
            for s in self.steps
            if s.touched or s.out_dtype != s.tensor.dtype or s.tensor.name not in self.base.tensors
        ]


@dataclass
class _Targets:
    """What the adapters do to each tensor name, gathered while planning (mutable only here)."""

    tensors: Mapping[str, TensorInfo]
    names: BaseNames
    terms: dict[str, list[Term]]
    sources: dict[str, list[Source]]
    findings: list[Finding]
    tuners: dict[str, list[TunerTerm]] = field(default_factory=dict)


def plan_surgery(
    operation: Operation,
    base: Checkpoint,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    scale: float = 1.0,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> Plan:
    """Resolve every adapter module onto one base tensor and check that it fits (FORMATS.md §1.5, §2.2-§2.7).

    `weights[i] * scale` multiplies adapter i's own LoRA scale; `dtype` (a safetensors dtype name)
    converts every floating-point tensor, None keeps each tensor's dtype. `allow_nonfinite` turns NaN/Inf
    in the adapter factors from errors into warnings (and lets the surgery carry those of the base).
    """
    ties = tied_weights(base)
    tensors = {**base.tensors, **{a.name: a for a in ties.aliases}}
    found = _Targets(tensors, BaseNames(tensors), {}, {}, quantized_findings(base.config, base.tensors, base.root))
    found.findings += repeated(adapters)
    model_type = (base.config or {}).get("model_type")
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        tied = followers(adapter, ties)  # PEFT gives them the embedding's LoRA (ensure_weight_tying)
        found.findings += [_ignored(key) for key in adapter.ignored if key not in tied]
        if adapter.empty:
            found.findings.append(Finding.of("error", f"{adapter.path}: the adapter selects no module to change"))
        skipped = found.names.skipped(adapter)
        found.findings += skipped.values()
        for module in adapter.modules:
            if module.module not in skipped:
                _add_module(found, index, adapter, module, weight * scale, model_type, allow_nonfinite)
        tuners, problems = place_tuners(found.tensors, index, adapter, weight * scale, model_type, allow_nonfinite)
        found.findings += problems
        for name, placed in tuners.items():
            found.tuners.setdefault(name, []).extend(placed)
        _add_sources(found, index, adapter)
    expected = _expected(operation, found)
    found.findings += _combination_findings(operation, found)
    tie = _untie(base, ties, found, adapters)
    steps = _steps(base, found, dtype, tie.aliases, expected)
    findings = (*found.findings, *((tie.finding,) if tie.finding else ()))
    config = output_config(base.config, tie.config, dtype)
    return Plan(operation, base, tuple(adapters), tuple(weights), steps, findings, allow_nonfinite, config)


def _untie(base: Checkpoint, ties: Ties, found: _Targets, adapters: Sequence[Adapter]) -> Untie:
    """Tied weights get what PEFT's forward gives them: trainable-token rows, and the LoRA and saved copies of an
    adapter whose config ties them to the embedding's, follow the tie; any other difference unties."""
    share(found.sources, ties, lambda s: s.indices is not None or adapters[s.adapter].tied_lora)
    share(found.terms, ties, lambda t: adapters[t.adapter].tied_lora)

    def gets(name: str) -> object:  # saved copies of the base weight are the base's own values
        sources = [s for s in found.sources.get(name, []) if not s.saved_base]
        return found.terms.get(name, []), sources, found.tuners.get(name, [])

    return untie(base, ties, gets, lambda name: gets(name) != ([], [], []))


def _expected(operation: Operation, found: _Targets) -> dict[str, Source]:
    """Unmerge: PEFT's saved copies of base weights are no start value but what merged − ΔW must give back."""
    if operation != "unmerge":
        return {}
    expected = {}
    for name, sources in found.sources.items():
        saved = [s for s in sources if s.saved_base]
        if saved and name in found.terms:
            expected[name] = saved[0]
        found.sources[name] = [s for s in sources if not s.saved_base]
    return expected


def _add_module(
    found: _Targets,
    index: int,
    adapter: Adapter,
    module: LoraModule,
    weight: float,
    model_type: str | None,
    allow_nonfinite: bool,
) -> None:
    """Resolve one module's weight (and lora_B bias) target and record its terms, or the findings against it."""
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
        bias, problem = _bias_target(found.tensors, module.module, module.bias)
        if bias is None:
            found.findings.append(Finding.against(module.bias.name, info.name, problem))
        else:
            found.terms.setdefault(bias.name, []).append(Term(index, module, weight * module.scale, False, True))


def _overlap(rows: tuple[int, int] | None, other: tuple[int, int] | None) -> bool:
    """Whether two terms change common rows of one tensor (None: all of them)."""
    return rows is None or other is None or (rows[0] < other[1] and other[0] < rows[1])


def _bias_target(tensors: Mapping[str, TensorInfo], module: str, bias: TensorInfo) -> tuple[TensorInfo | None, str]:
    """The base bias a lora_B bias is added to (FORMATS.md §2.6); PEFT refuses a layer without one."""
    names = [c for c in tensor_candidates(module, "bias") if c in tensors]
    if not names:
        return None, "lora_bias needs a bias in the base layer, and this layer has none (PEFT refuses it too)"
    info = tensors[names[0]]
    if info.shape != bias.shape:
        return None, f"lora_B.bias has shape {list(bias.shape)} but {info.name} has {list(info.shape)}"
    return info, ""


def _add_sources(found: _Targets, index: int, adapter: Adapter) -> None:
    """Record the adapter's replacement tensors and trainable-token rows against the base tensors they set."""
    wanted: list[tuple[str, str, TensorInfo, tuple[int, ...] | None, bool]]
    wanted = [(r.module, r.param, r.tensor, None, r.saved_base) for r in adapter.replacements]
    wanted += [(t.module, "weight", t.tensor, t.indices, False) for t in adapter.token_rows]
    for module, param, tensor, indices, saved_base in wanted:
        names = [c for c in tensor_candidates(module, param) if c in found.tensors]
        if not names:
            missing = f"it sets {module}.{param}, which is not in the base"
            found.findings.append(Finding.against(tensor.name, None, missing))
            continue
        info = found.tensors[names[0]]
        problem = _source_problem(info, tensor, indices)
        if problem:
            found.findings.append(Finding.against(tensor.name, info.name, problem))
        else:
            found.sources.setdefault(info.name, []).append(Source(index, tensor, indices, saved_base))
    found.findings += _unsaved(found, index, adapter)


def _unsaved(found: _Targets, index: int, adapter: Adapter) -> list[Finding]:
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


def _source_problem(info: TensorInfo, tensor: TensorInfo, indices: tuple[int, ...] | None) -> str | None:
    if not tensor.is_float or not info.is_float:
        return f"replacing a {info.dtype} tensor with {tensor.dtype} values is not supported"
    if indices is None:
        if tensor.shape != info.shape:
            return (
                f"replacement has shape {list(tensor.shape)} but the base tensor has {list(info.shape)} "
                "(a resized vocabulary must be resized in the base first)"
            )
        return None
    if tensor.shape[1:] != info.shape[1:] or not all(0 <= i < info.shape[0] for i in indices):
        largest = max(indices, default=0)
        return f"trainable token rows {list(tensor.shape)} (largest index {largest}) do not fit {list(info.shape)}"
    return None


def _combination_findings(operation: Operation, found: _Targets) -> list[Finding]:
    """What cannot be combined on one tensor, or cannot be undone (FORMATS.md §2.7, §3, §4.5)."""
    problems = []
    for name, sources in found.sources.items():
        if operation == "unmerge":
            problem = "unmerge cannot restore it: the adapter holds its new values, not the original ones"
            problems += [Finding.against(s.tensor.name, name, problem) for s in sources]
        elif len(sources) > 1 and not _disjoint_rows(sources) and not all(s.saved_base for s in sources):
            problems.append(Finding.against(sources[1].tensor.name, name, "another adapter already sets these values"))
        elif any(s.indices is not None for s in sources) and name in found.terms:
            problem = "trainable token rows and a LoRA on the same tensor cannot be merged in a defined order"
            problems.append(Finding.against(sources[0].tensor.name, name, problem))
    for name, terms in found.terms.items():
        dora = next((t for t in terms if t.dora), None)
        if dora is None:
            continue
        key = dora.module.a.name
        if operation == "unmerge":
            problems.append(Finding.against(key, name, f"DoRA cannot be unmerged: {DORA_UNMERGE}"))
        elif len([t for t in terms if not t.bias]) > 1:
            problems.append(Finding.against(key, name, "a DoRA module must be the only adapter changing its weight"))
        elif abs(dora.factor - dora.module.scale) > 1e-12 * abs(dora.module.scale):
            problems.append(Finding.against(key, name, "a DoRA module can only be merged with weight 1 and scale 1"))
    return problems + combination_findings(operation, found.tuners, found.terms, found.sources)


def _disjoint_rows(sources: list[Source]) -> bool:
    """True when the sources only set rows, and no row twice (a whole replacement conflicts with anything)."""
    if any(s.indices is None for s in sources):
        return False
    rows = [i for s in sources for i in s.indices or ()]
    return len(rows) == len(set(rows))


def _steps(
    base: Checkpoint,
    found: _Targets,
    dtype: str | None,
    aliases: tuple[TensorInfo, ...],
    expected: Mapping[str, Source],
) -> tuple[Step, ...]:
    """One step per base tensor in shard and file order; untied weights follow the tensor they were tied to."""
    steps = []
    for shard in base.shards:
        for info in shard.header.tensors:
            for tensor in (info, *(a for a in aliases if _same_bytes(info, a))):
                sources = found.sources.get(tensor.name, [])
                whole = next((s for s in sources if s.indices is None), None)
                rows = tuple(s for s in sources if s.indices is not None)
                out_dtype = dtype if dtype and tensor.is_float else tensor.dtype
                terms = tuple(found.terms.get(tensor.name, ()))
                tuners = tuple(found.tuners.get(tensor.name, ()))
                steps.append(Step(tensor, shard.name, out_dtype, terms, whole, rows, expected.get(tensor.name), tuners))
    return tuple(steps)


def _same_bytes(info: TensorInfo, alias: TensorInfo) -> bool:
    return (info.path, info.start) == (alias.path, alias.start)


def _ignored(key: str) -> Finding:
    problem = "its module is not selected by the adapter config, so PEFT ignores it and so does lorasurgeon"
    return Finding.against(key, None, problem, severity="warning")
