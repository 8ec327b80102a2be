"""Which modules of which adapters make each module of OUT: the flat plan of `resize` and `combine`, from headers
only, checked before any factor is read.

One `Job` per module of OUT, in order of first appearance, holding one `Term` per adapter that has the module (a
module missing from an adapter contributes zero: the union of the target sets). Names are matched in OUT's
format (formats.computed.output_names), so a PEFT and a diffusers adapter of the same model meet by module path.
Refused by name before anything is written: two adapters whose factors give one module different shapes
(adapters for different bases), LyCORIS LoHa / LoKr / Tucker modules and DoRA magnitudes (their ΔW is not the
linear B·A the algebra combines), and what OUT's format cannot hold. Full tensors (modules_to_save, saved
embeddings) are carried by `resize`; `combine` takes their weighted mean when the weights sum to 1 (`--mean`,
FedAvg) and every adapter holds the same tensor, and refuses them otherwise: without BASE, a weighted sum of full
replacements has no meaning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lorasurgeon.adapter import Adapter, AdapterFormat, LoraModule
from lorasurgeon.errors import LorasurgeonError, MismatchError, Option, UnsupportedError
from lorasurgeon.formats import computed
from lorasurgeon.formats.limits import CANNOT
from lorasurgeon.header import TensorInfo

Method = Literal["cat", "svd", "ties", "dare", "dare_ties", "magnitude_prune"]
METHODS: tuple[Method, ...] = ("cat", "svd", "ties", "dare", "dare_ties", "magnitude_prune")
DENSE_METHODS = ("ties", "dare", "dare_ties", "magnitude_prune")  # need each module's dense ΔWᵢ (dense_merge)


@dataclass(frozen=True)
class Term:
    """One adapter's part of a module of OUT: `weight`·ΔW of `module` (ΔW = scale·B·A)."""

    adapter: int
    module: LoraModule
    weight: float

    @property
    def rank(self) -> int:
        return int(self.module.a.shape[0])

    @property
    def coefficient(self) -> float:
        """cᵢ = weightᵢ·scaleᵢ, what Bᵢ·Aᵢ is multiplied by in the sum."""
        return self.weight * self.module.scale


@dataclass(frozen=True)
class Job:
    """One module of OUT: its name in OUT's format and its terms; ΔW is (rows, columns), B (rows, r) and A
    (r, columns) once a conv kernel is flattened (A (r, in, *k) -> (r, in·∏k))."""

    name: str
    terms: tuple[Term, ...]
    rows: int
    columns: int

    @property
    def stacked_rank(self) -> int:
        return sum(t.rank for t in self.terms)

    @property
    def first(self) -> LoraModule:
        return self.terms[0].module


@dataclass(frozen=True)
class Full:
    """A tensor OUT holds in full, `key`: the weighted mean of `terms` (adapter, tensor, weight)."""

    key: str
    terms: tuple[tuple[int, TensorInfo, float], ...]


@dataclass(frozen=True)
class Combination:
    """The plan: the jobs, the full tensors, and the tensors left out (modules the config does not select)."""

    jobs: tuple[Job, ...]
    full: tuple[Full, ...]
    left_out: tuple[str, ...]


def plan_combination(adapters: Sequence[Adapter], weights: Sequence[float], to: AdapterFormat) -> Combination:
    """The jobs of Σ weightᵢ·ΔWᵢ in OUT's format `to`; raises as the module docstring says, naming the tensor."""
    if not adapters:
        raise LorasurgeonError("there is no adapter to combine: give at least one ADAPTER (an empty client list?)")
    if len(weights) != len(adapters):
        raise LorasurgeonError(
            Option("weights", cli="weight"),
            f" gives {len(weights)} weights for {len(adapters)} adapters; give one each",
        )
    grouped: dict[str, list[Term]] = {}
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        for module in adapter.modules:
            _refuse(adapter, module, to)
        names = computed.output_names(adapter, adapter.modules, to)
        for name, module in zip(names, adapter.modules, strict=True):
            grouped.setdefault(name, []).append(Term(index, module, weight))
    jobs = tuple(_job(name, terms, adapters) for name, terms in grouped.items())
    if not jobs:
        raise LorasurgeonError(f"{adapters[0].path}: holds no LoRA module, so there is nothing to {_verb(adapters)}")
    left_out = tuple(name for adapter in adapters for name in adapter.ignored)
    return Combination(jobs, _full(adapters, weights, to), left_out)


def _verb(adapters: Sequence[Adapter]) -> str:
    return "resize" if len(adapters) == 1 else "combine"


def _refuse(adapter: Adapter, module: LoraModule, to: AdapterFormat) -> None:
    if module.factors:
        raise UnsupportedError(
            f"{adapter.path}: {module.a.name} is a LyCORIS {module.kind} module, whose ΔW is no product B·A, and its "
            "file does not say the layout of the base weight that ΔW would need; nothing was written (merge it instead)"
        )
    if module.magnitude is not None:
        raise UnsupportedError(
            f"{adapter.path}: {module.magnitude.name} is a DoRA magnitude: a DoRA module's weight is rescaled by the "
            "norm of W + ΔW, so neither a truncated nor a combined ΔW says what it becomes; nothing was written"
        )
    refused = computed.refusal(adapter, module, to)
    if refused is not None:
        raise refused


def _job(name: str, terms: list[Term], adapters: Sequence[Adapter]) -> Job:
    """The job of one module; MismatchError when two adapters give it different shapes or kinds."""
    first = terms[0]
    for term in terms[1:]:
        if _shape(term.module) != _shape(first.module):
            one, other = adapters[term.adapter].path, adapters[first.adapter].path
            raise MismatchError(
                f"{name}: {one} has {_describe(term.module)} but {other} has {_describe(first.module)}: the adapters "
                "are for different bases (or different shapes of this module); nothing was written"
            )
    a, b = first.module.a.shape, first.module.b.shape
    return Job(name, tuple(terms), int(b[0]), math.prod(a[1:]))


def _shape(m: LoraModule) -> tuple[object, ...]:
    return (m.kind, m.fan_in_fan_out, m.b.shape[0], m.b.shape[2:], m.a.shape[1:], m.bias is not None)


def _describe(m: LoraModule) -> str:
    what = f"a {m.kind} module" + (" with a lora_B bias" if m.bias is not None else "")
    flag = " (fan_in_fan_out)" if m.fan_in_fan_out else ""
    return f"{what}{flag} of {m.b.name} {list(m.b.shape)} and {m.a.name} {list(m.a.shape)}"


def _full(adapters: Sequence[Adapter], weights: Sequence[float], to: AdapterFormat) -> tuple[Full, ...]:
    """Full tensors: carried by resize; for combine, their weighted mean where that has a meaning."""
    first = adapters[0]
    tensors = [r.tensor for r in first.replacements] + [t.tensor for t in first.token_rows]
    extra = [t for a in adapters[1:] for t in [r.tensor for r in a.replacements] + [t.tensor for t in a.token_rows]]
    if not tensors and not extra:
        return ()
    if to != "peft":
        info = (tensors or extra)[0]
        what = "tokens" if info in [t.tensor for a in adapters for t in a.token_rows] else "replacement"
        raise UnsupportedError(f"{first.path}: {info.name} {CANNOT[to, what]}; nothing was written")
    if len(adapters) == 1:
        return tuple(Full(computed.full_key(t.name), ((0, t, 1.0),)) for t in tensors)
    if first.token_rows or any(a.token_rows for a in adapters):
        rows = next(t.tensor for a in adapters for t in a.token_rows)
        raise UnsupportedError(
            f"{rows.name}: trainable-token rows are not combined (only resized); nothing was written"
        )
    if abs(sum(weights) - 1.0) > 1e-9:
        raise UnsupportedError(
            f"{(tensors or extra)[0].name}: a full replacement tensor (modules_to_save) has a weighted mean only when "
            "the weights sum to 1; pass ",
            Option("mean", flag=True),
            "; nothing was written",
        )
    return tuple(_mean(t, adapters, weights) for t in tensors) + _unmatched(extra, tensors)


def _mean(info: TensorInfo, adapters: Sequence[Adapter], weights: Sequence[float]) -> Full:
    terms = []
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        match = next((r.tensor for r in adapter.replacements if r.tensor.name == info.name), None)
        if match is None or match.shape != info.shape:
            held = "does not hold it" if match is None else f"holds it as {list(match.shape)}, not {list(info.shape)}"
            raise UnsupportedError(
                f"{info.name}: {adapter.path} {held}, so its weighted mean is not defined without BASE; nothing was "
                "written"
            )
        terms.append((index, match, weight))
    return Full(computed.full_key(info.name), tuple(terms))


def _unmatched(extra: Sequence[TensorInfo], tensors: Sequence[TensorInfo]) -> tuple[Full, ...]:
    names = {t.name for t in tensors}
    missing = next((t for t in extra if t.name not in names), None)
    if missing is not None:
        raise UnsupportedError(
            f"{missing.name}: the first adapter does not hold it, so its weighted mean is not defined without BASE; "
            "nothing was written"
        )
    return ()
