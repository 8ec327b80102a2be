"""Merge and unmerge one module of a non-LoRA PEFT tuner: the entry point the plan and the surgery call.

`merge(module, base, factors, layer=...)` takes the base tensors the module writes ("weight", "bias"; any
replacement of the adapter already applied), the module's tensors by role (its own and the adapter's shared
ones), and how the base layer stores its weight; it returns the new tensors in fp32 (the caller rounds them
once). `unmerge` inverts it where the files allow, else raises UnsupportedError naming why; `check` says from
shapes alone whether a module fits its base (for `check` and `--dry-run`); `delta` is ΔW of an additive module,
which the surgery adds with the other adapters' terms. The tables are tuner_deltas (additive tuners) and
tuner_products (the others); what needs no torch is in tuner_shapes.

Example: `merge(module, {"weight": w}, {"ia3_l": v}, layer="linear")["weight"]` is W scaled by (IA)³'s v.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lorasurgeon.adapter import Layer, TunerModule
from lorasurgeon.errors import MismatchError, UnsupportedError
from lorasurgeon.tuner_deltas import Dims, additive_delta
from lorasurgeon.tuner_kinds import is_additive, unmerge_refusal
from lorasurgeon.tuner_products import MULTIPLICATIVE
from lorasurgeon.tuner_shapes import check

__all__ = ["check", "delta", "is_additive", "merge", "unmerge", "unmerge_refusal"]

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
    why = unmerge_refusal(module)
    if why:
        raise UnsupportedError(f"module {module.module}: cannot unmerge {module.tuner}: {why}")
    return _apply(module, merged, factors, layer, sign=-1)


def delta(module: TunerModule, shape: tuple[int, ...], factors: Tensors, *, layer: Layer = "linear") -> torch.Tensor:
    """ΔW of an additive module (see is_additive), laid out as a base weight of `shape`, in fp32."""
    d = additive_delta(module, _floats(factors), Dims.of(shape, layer))
    if d is None:
        raise UnsupportedError(f"module {module.module}: {module.tuner} has no ΔW independent of the base weight")
    return d.T if layer == "conv1d" else d


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
