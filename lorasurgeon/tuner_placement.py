"""Placing the modules of a non-LoRA PEFT tuner (IA3, OFT, VeRA, ...) on a base checkpoint, from headers: the
base tensors each module changes (its weight, and its bias when it writes the bias), the layer kind its maths
needs, whether its tensors fit (tuner_shapes.check), and what cannot be combined on one tensor.

A tuner whose new weight is W + ΔW with ΔW independent of W adds its ΔW to the other adapters' terms, like a
LoRA; the others (products: IA3 scales W, OFT rotates it, ...) must be alone on what they change, since the
order in which two adapters apply would decide the result, and are merged with weight 1 only. A module the
config selects but the file lacks is an error: PEFT would give it a fresh initialisation, which no file says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from lorasurgeon.adapter import Adapter, Layer, TunerModule
from lorasurgeon.errors import Finding, Option
from lorasurgeon.formats.architectures import is_conv1d, tensor_candidates
from lorasurgeon.header import TensorInfo
from lorasurgeon.tuner_kinds import is_additive, unmerge_refusal
from lorasurgeon.tuner_shapes import check

EMBEDDING_ROLES = ("oft_embedding_R.weight", "hira_embedding_A")


@dataclass(frozen=True)
class TunerTerm:
    """One tuner module's change to one base tensor, its `param` ("weight" or "bias") of the module.

    `factor` is the adapter's weight times the merge's scale (the module's own scaling is in its maths; a product
    takes 1 only); `layer` says how the base stores the module's weight; `weight` is that weight when the term
    is the bias (the maths reads W to change a bias: its shape, and GLoRA's b + W C its values)."""

    adapter: int
    module: TunerModule
    param: str
    factor: float
    layer: Layer
    weight: TensorInfo | None = None

    @property
    def additive(self) -> bool:
        return is_additive(self.module)


def layer_of(module: TunerModule, weight: TensorInfo | None, model_type: str | None) -> Layer:
    """How the base stores `module`'s weight: an embedding when the tuner saved embedding factors, a conv kernel
    when W has more than two dimensions, a transformers Conv1D by the architecture's table (without one, by the
    config's fan_in_fan_out, as for LoRA), else a Linear."""
    if any(role in module.factors for role in EMBEDDING_ROLES):
        return "embedding"
    if weight is not None and len(weight.shape) > 2:
        return "conv"
    conv1d = is_conv1d(model_type, module.module) if model_type is not None else module.fan_in_fan_out
    return "conv1d" if conv1d else "linear"


def place_tuners(
    tensors: Mapping[str, TensorInfo],
    index: int,
    adapter: Adapter,
    factor: float,
    model_type: str | None,
    allow_nonfinite: bool,
) -> tuple[dict[str, list[TunerTerm]], list[Finding]]:
    """Every tuner module of adapter `index` placed on the base `tensors`: base tensor name -> its terms, and the
    findings against the modules (misfits, NaN/Inf in their tensors, selected modules the file lacks)."""
    placed: dict[str, list[TunerTerm]] = {}
    findings: list[Finding] = []
    for module in adapter.tuner_modules:
        terms, problems = _place(tensors, index, adapter, module, factor, model_type)
        problems += _nonfinite(adapter, module.tensors, allow_nonfinite)
        findings += problems
        if not any(p.severity == "error" for p in problems):
            for name, term in terms.items():
                placed.setdefault(name, []).append(term)
    if placed:
        findings += _nonfinite(adapter, tuple(adapter.shared.values()), allow_nonfinite)
    findings += _missing(tensors, adapter, placed)
    return placed, findings


def _place(
    tensors: Mapping[str, TensorInfo],
    index: int,
    adapter: Adapter,
    module: TunerModule,
    factor: float,
    model_type: str | None,
) -> tuple[dict[str, TunerTerm], list[Finding]]:
    key = module.first.name
    found: dict[str, TensorInfo] = {}
    for param in dict.fromkeys((*module.writes, *module.needs)):
        names = [c for c in tensor_candidates(module.module, param) if c in tensors]
        if len(names) > 1:
            return {}, [Finding.against(key, None, f"target is ambiguous: {' and '.join(names)} both exist")]
        if names:
            found[param] = tensors[names[0]]
    weight = found.get("weight")
    where = weight.name if weight is not None else next((t.name for t in found.values()), None)
    if not found:
        return {}, [Finding.against(key, None, f"target {module.target()} is not in the base checkpoint")]
    if any(not t.is_float for t in found.values()):
        bad = next(t for t in found.values() if not t.is_float)
        return {}, [Finding.against(key, bad.name, f"base tensor has dtype {bad.dtype}, not floating point")]
    layer = layer_of(module, weight, model_type)
    shapes = {r: t.shape for r, t in {**adapter.shared, **module.factors}.items()}
    problem = check(module, {p: t.shape for p, t in found.items()}, shapes, layer)
    if problem:
        return {}, [Finding.against(key, where, f"the {module.tuner} module {problem}")]
    if not is_additive(module) and factor != 1.0:
        problem = (
            f"a {module.tuner} module changes the weight by a product, not a sum, so it can only be merged with "
            "weight 1 and scale 1"
        )
        return {}, [Finding.against(key, where, problem)]
    terms = {
        info.name: TunerTerm(index, module, param, factor, layer, weight if param != "weight" else None)
        for param, info in found.items()
        if param in module.writes
    }
    return terms, []


def _nonfinite(adapter: Adapter, infos: tuple[TensorInfo, ...], allow: bool) -> list[Finding]:
    """NaN/Inf in tensors (counted when the adapter was loaded) spread over the result: an error, or with `allow`
    a warning."""
    problems = []
    flag = Option("allow_nonfinite", flag=True)
    for info in infos:
        bad = adapter.nonfinite.get(info.name, 0)
        if bad and allow:
            problems.append(
                Finding.against(
                    info.name, None, f"holds {bad} NaN/Inf values, merged anyway (", flag, ")", severity="warning"
                )
            )
        elif bad:
            parts = (f"holds {bad} NaN/Inf values, which would spread over the result (", flag, " lets them)")
            problems.append(Finding.against(info.name, None, *parts))
    return problems


def _missing(tensors: Mapping[str, TensorInfo], adapter: Adapter, placed: dict[str, list[TunerTerm]]) -> list[Finding]:
    """Base modules the config selects whose tensors the file lacks (checked on the base's names as stored)."""
    if adapter.selection is None or not adapter.tuner_modules:
        return []
    tuner = adapter.tuner_modules[0].tuner
    modules = (*adapter.tuner_modules, *adapter.tuner_unselected)
    have = {name for m in modules for name in tensor_candidates(m.module, "weight")}
    problem = (
        f"adapter_config.json selects it but the adapter holds no {tuner} tensors for it: PEFT would give it a "
        "fresh initialisation, which no file records"
    )
    return [
        Finding.against(str(adapter.path), name, problem)
        for name in tensors
        if name.endswith(".weight")
        and name not in have
        and name not in placed
        and adapter.selection.selects(name.removesuffix(".weight"))
    ]


class _Change(Protocol):
    """A LoRA term or a source of the plan, as far as combining them matters."""

    @property
    def adapter(self) -> int: ...


class _LoraTerm(_Change, Protocol):
    @property
    def dora(self) -> bool: ...


def combination_findings(
    operation: str,
    tuners: Mapping[str, Sequence[TunerTerm]],
    terms: Mapping[str, Sequence[_LoraTerm]],
    sources: Mapping[str, Sequence[_Change]],
) -> list[Finding]:
    """What cannot be combined on one tensor, or undone: a product with any other adapter's change of it (or of
    the weight a GLoRA bias reads), a tuner on a DoRA module's weight, an unmerge the files cannot give. `terms`
    are the plan's LoRA terms per tensor, `sources` the tensors set outright."""
    problems = []
    for name, placed in tuners.items():
        for term in placed:
            key = term.module.first.name
            foreign = [s for s in sources.get(name, ()) if s.adapter != term.adapter]
            if operation == "unmerge" and not term.additive and (why := unmerge_refusal(term.module)):
                problems.append(Finding.against(key, name, f"{term.module.tuner} cannot be unmerged: {why}"))
            elif any(t.dora for t in terms.get(name, ())):
                problems.append(
                    Finding.against(key, name, "a DoRA module must be the only adapter changing its weight")
                )
            elif not term.additive and (len(placed) > 1 or terms.get(name) or foreign or _reads_changed(term, terms)):
                problem = (
                    f"a {term.module.tuner} module changes it by a product, so it must be the only adapter changing "
                    "it (the order in which the two apply would decide the result)"
                )
                problems.append(Finding.against(key, name, problem))
    return problems


def _reads_changed(term: TunerTerm, terms: Mapping[str, Sequence[_Change]]) -> bool:
    """Whether the bias term reads a weight that a LoRA term changes too (GLoRA's b + W C wants the original W)."""
    return term.weight is not None and term.module.tuner == "GLORA" and bool(terms.get(term.weight.name))
