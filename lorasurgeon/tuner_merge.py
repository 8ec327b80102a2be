"""Merge and unmerge one module of a non-LoRA PEFT tuner: the entry point the plan and the surgery call.

`merge(module, base, factors, layer=...)` takes the base tensors the module writes ("weight", "bias"; any
replacement of the adapter already applied), the module's tensors by role (its own and the adapter's shared
ones), and how the base layer stores its weight; it returns the new tensors in fp32 (the caller rounds them
once). `unmerge` inverts it where the files allow, else raises UnsupportedError naming why; `check` says from
shapes alone whether a module fits its base (for `check` and `--dry-run`); `delta` is ΔW of an additive module
(for `report`). The tables are tuner_deltas (additive tuners) and tuner_products (the others).

Example: `merge(module, {"weight": w}, {"ia3_l": v}, layer="linear")["weight"]` is W scaled by (IA)³'s v.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lorasurgeon.errors import MismatchError, UnsupportedError
from lorasurgeon.tuner import Layer, TunerModule
from lorasurgeon.tuner_deltas import Dims, additive_delta
from lorasurgeon.tuner_products import MULTIPLICATIVE, NOT_INVERTIBLE
from lorasurgeon.tuner_shapes import fit_problem, layer_problem

Tensors = Mapping[str, torch.Tensor]
Shapes = Mapping[str, tuple[int, ...]]


def merge(module: TunerModule, base: Tensors, factors: Tensors, *, layer: Layer = "linear") -> dict[str, torch.Tensor]:
    """The module's new base tensors (those of `module.writes` that `base` holds), in fp32.

    Raises MismatchError when the tensors do not fit the base, UnsupportedError for a layer the tuner does
    not adapt exactly.
    """
    return _apply(module, base, factors, layer, sign=1)


def unmerge(
    module: TunerModule, merged: Tensors, factors: Tensors, *, layer: Layer = "linear"
) -> dict[str, torch.Tensor]:
    """The base tensors before `merge`, from the merged ones, in fp32; UnsupportedError where the files cannot
    give them (see unmerge_refusal; data can refuse too: an IA3 vector with a zero entry)."""
    why = unmerge_refusal(module.tuner)
    if why:
        raise UnsupportedError(f"module {module.module}: cannot unmerge {module.tuner}: {why}")
    return _apply(module, merged, factors, layer, sign=-1)


def delta(module: TunerModule, shape: tuple[int, ...], factors: Tensors, *, layer: Layer = "linear") -> torch.Tensor:
    """ΔW of an additive module (see is_additive), laid out as a base weight of `shape`, in fp32."""
    d = additive_delta(module, _floats(factors), Dims.of(shape, layer))
    if d is None:
        raise UnsupportedError(f"module {module.module}: {module.tuner} has no ΔW independent of the base weight")
    return d.T if layer == "conv1d" else d


def is_additive(module: TunerModule) -> bool:
    """Whether the module adds to W a ΔW that does not depend on W (unmerge then subtracts it)."""
    return module.tuner not in MULTIPLICATIVE or (module.tuner == "MISS" and module.params.get("kind") != "bat")


def unmerge_refusal(tuner: str) -> str | None:
    """Why a tuner can never be unmerged from its files, or None."""
    return NOT_INVERTIBLE.get(tuner)


def check(module: TunerModule, base: Shapes, factors: Shapes, layer: Layer) -> str | None:
    """A clause saying why the module does not fit base tensors of these shapes ("has ia3_l [1, 48] ..."),
    or None when it fits. `factors` holds the module's and the shared tensors' shapes by role."""
    return layer_problem(module, base, layer) or fit_problem(module, base, factors, layer)


def _apply(module: TunerModule, base: Tensors, factors: Tensors, layer: Layer, sign: int) -> dict[str, torch.Tensor]:
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    problem = check(module, shapes, {k: tuple(v.shape) for k, v in factors.items()}, layer)
    if problem:
        raise MismatchError(f"module {module.module} {problem}")
    f, b = _floats(factors), {k: v.float() for k, v in base.items() if k in module.writes}
    if is_additive(module):
        w = b["weight"]
        d = additive_delta(module, f, Dims.of(tuple(w.shape), layer))
        if d is None:
            raise AssertionError(module.tuner)  # is_additive and additive_delta agree by construction
        return {"weight": w + sign * (d.T if layer == "conv1d" else d)}
    merge_step, unmerge_step = MULTIPLICATIVE[module.tuner]
    return (merge_step if sign > 0 else unmerge_step)(module, b, f, layer)


def _floats(factors: Tensors) -> dict[str, torch.Tensor]:
    """Tensors in fp32; integer ones (SHiRA / VB-LoRA / Supertuning indices) as they are."""
    return {k: v.float() if v.is_floating_point() else v for k, v in factors.items()}
