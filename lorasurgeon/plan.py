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
checked by lorasurgeon.fit, and each module's terms placed by lorasurgeon.placement; the modules of other PEFT
tuners (IA3, OFT, VeRA, ...) are placed by lorasurgeon.tuner_placement. The plan reads headers only: the factors'
NaN/Inf counts come with the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lorasurgeon.adapter import Adapter, repeated
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.conflicts import combination_findings as conflicts
from lorasurgeon.errors import Finding
from lorasurgeon.expert_fit import ExpertCount, self_test
from lorasurgeon.formats.resolution import BaseNames
from lorasurgeon.header import TensorInfo
from lorasurgeon.model_config import output_config
from lorasurgeon.placement import Source, Targets, Term, add_module, add_sources, ignored
from lorasurgeon.quantized import Quantization, QuantizedPart
from lorasurgeon.quantized_plan import QuantizedBase, quantized_base
from lorasurgeon.ties import Ties, Untie, followers, share, tied_weights, untie
from lorasurgeon.tuner_placement import TunerTerm, place_tuners

Operation = Literal["merge", "unmerge"]


@dataclass(frozen=True)
class Step:
    """Write `tensor` to output shard `shard` as `out_dtype`: its base value, or `replacement`'s, with `rows`
    set, plus `terms` and the `tuners`' changes (nothing at all: copy it unchanged). A `tensor` whose name the base
    lacks is an alias of a base tensor's bytes under a new name (an untied head). `expected`: what an unmerge must
    give back, up to rounding (PEFT's saved copy of the base weight). `quantized`: the tensor is a stored part of a
    quantized weight, merged in format (the terms are the weight's), or the weight dequantized."""

    tensor: TensorInfo
    shard: str
    out_dtype: str
    terms: tuple[Term, ...]
    replacement: Source | None = None
    rows: tuple[Source, ...] = ()
    expected: Source | None = None
    tuners: tuple[TunerTerm, ...] = ()
    quantized: QuantizedPart | None = None

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
    experts: tuple[ExpertCount, ...] = ()  # per experts module: the experts its terms cover (the self-test)
    quantization: Quantization | None = None

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
            if s.touched or s.quantized or s.out_dtype != s.tensor.dtype or s.tensor.name not in self.base.tensors
        ]


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
    quant, quant_findings = quantized_base(base, dtype)
    tensors = {**base.tensors, **{a.name: a for a in ties.aliases}}
    tensors = {**tensors, **quant.logical(tensors)} if quant else tensors
    found = Targets(tensors, BaseNames(tensors, base.config), {}, {}, quant_findings)
    found.findings += repeated(adapters)
    model_type = (base.config or {}).get("model_type")
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        tied = followers(adapter, ties)  # PEFT gives them the embedding's LoRA (ensure_weight_tying)
        notes = adapter.notes if quant is None else ()  # what merging a QLoRA adapter into a 16-bit base means
        found.findings += [*notes, *(ignored(key) for key in adapter.ignored if key not in tied)]
        if adapter.empty:
            found.findings.append(Finding.of("error", f"{adapter.path}: the adapter selects no module to change"))
        skipped = found.names.skipped(adapter)
        found.findings += skipped.values()
        for module in adapter.modules:
            if module.module not in skipped:
                add_module(found, index, adapter, module, weight * scale, model_type, allow_nonfinite)
        tuners, problems = place_tuners(found.tensors, index, adapter, weight * scale, model_type, allow_nonfinite)
        found.findings += problems
        for name, placed in tuners.items():
            found.tuners.setdefault(name, []).extend(placed)
        add_sources(found, index, adapter)
    expected = _expected(operation, found)
    found.findings += conflicts(operation, found.sources, found.terms, found.tuners)
    pieces = [(t.module, t.piece) for terms in found.terms.values() for t in terms if t.piece is not None]
    targets = [t for adapter in adapters for t in adapter.target_parameters]
    experts, problems = self_test(pieces, targets, found.terms, base.tensors)
    found.findings += problems
    tie = _untie(base, ties, found, adapters)
    steps = _steps(base, found, dtype, tie.aliases, expected, quant)
    findings = (*found.findings, *((tie.finding,) if tie.finding else ()))
    config = output_config(base.config, tie.config, dtype)
    config = (quant.config(config or base.config) if quant else None) or config
    quantized = quant.quantization if quant else None
    return Plan(
        operation, base, tuple(adapters), tuple(weights), steps, findings, allow_nonfinite, config, experts, quantized
    )


def _untie(base: Checkpoint, ties: Ties, found: Targets, adapters: Sequence[Adapter]) -> Untie:
    """Tied weights get what PEFT's forward gives them: trainable-token rows, and the LoRA and saved copies of an
    adapter whose config ties them to the embedding's, follow the tie; any other difference unties."""
    share(found.sources, ties, lambda s: s.indices is not None or adapters[s.adapter].tied_lora)
    share(found.terms, ties, lambda t: adapters[t.adapter].tied_lora)

    def gets(name: str) -> object:  # saved copies of the base weight are the base's own values
        sources = [s for s in found.sources.get(name, []) if not s.saved_base]
        return found.terms.get(name, []), sources, found.tuners.get(name, [])

    return untie(base, ties, gets, lambda name: gets(name) != ([], [], []))


def _expected(operation: Operation, found: Targets) -> dict[str, Source]:
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


def _steps(
    base: Checkpoint,
    found: Targets,
    dtype: str | None,
    aliases: tuple[TensorInfo, ...],
    expected: Mapping[str, Source],
    quant: QuantizedBase | None,
) -> tuple[Step, ...]:
    """One step per base tensor in shard and file order; untied weights follow the tensor they were tied to; the
    stored parts of a quantized weight take its terms (quantized_plan says which, and which are dropped)."""
    steps = []
    for shard in base.shards:
        for info in shard.header.tensors:
            route = quant.route(info, found.terms) if quant else None
            if route is not None:
                if route.part is not None and route.tensor is not None:
                    part, terms = route.part, tuple(found.terms.get(route.part.weight.name, ()))
                    out_dtype = dtype if part.dequantize and dtype else info.dtype
                    steps.append(Step(route.tensor, shard.name, out_dtype, terms, quantized=part))
                continue
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
