"""compressed-tensors weights through the compressed-tensors library itself (the optional extra `lorasurgeon[quant]`):
a module's stored tensors to an fp32 weight, and a new fp32 weight back into the same scheme and stored layout.

The library's per-module compressors do the format: `BaseCompressor.get_value_from_registry(format)` gives the
class for "float-quantized" / "int-quantized" / "naive-quantized" (`weight` + `weight_scale` [+ zero point])
and "pack-quantized" (`weight_packed` + `weight_scale` + `weight_shape` [+ packed zero point]); its
`decompress(state_dict, scheme)` / `compress(state_dict, scheme)` take local names. Compressing needs fresh
qparams, which llm-compressor's observers compute and the library does not: this module reduces the weight to
per-tensor / per-channel / per-group / per-block minima and maxima (a min-max observer) and hands them to the
library's `calculate_qparams`, which applies the scheme's formula (symmetric: amax / (range / 2)).
Schemes are vetted first by formats/compressed_checkpoint.py; `scheme` is one config group as config.json has
it, with its resolved "format".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lorasurgeon.errors import InputError, UnsupportedError

MISSING = (
    "{where}: is a compressed-tensors checkpoint, which needs the compressed-tensors library: "
    "pip install 'lorasurgeon[quant]' (or compressed-tensors)"
)


@dataclass(frozen=True)
class CompressedMerge:
    """The merged module's new stored tensors (local name -> tensor) and the ΔW figures of
    lorasurgeon.fp8_merge.Fp8Merge."""

    tensors: dict[str, torch.Tensor]
    survival: float
    error: float
    finite: bool


def decompress(parts: Mapping[str, torch.Tensor], scheme: Mapping[str, Any], where: str) -> torch.Tensor:
    """The fp32 weight of one module from its stored tensors (local names: weight / weight_packed, weight_scale,
    weight_shape, weight_zero_point). Scales are up-cast to fp32 first, so bf16 scales give q · s in fp32, not
    rounded to bf16 as the library would."""
    return _decompressed(parts, scheme, where)["weight"]


def compress(
    weight: torch.Tensor, scheme: Mapping[str, Any], like: Mapping[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """The stored tensors of fp32 `weight` in `scheme` with fresh min-max qparams, rounded to the dtypes of the
    module's current tensors `like` (local names); only the names `like` has are returned (weight_shape
    aside), each shaped and typed like it. UnsupportedError where blocks or groups do not tile the weight."""
    compressor, args = _compressor(scheme, where)
    scale, zero_point = _fresh(weight, args.weights, like["weight_scale"].dtype, where)
    return _compress(compressor, args, weight, scale, zero_point, like, where)


def merge_compressed(
    parts: Mapping[str, torch.Tensor], scheme: Mapping[str, Any], delta: torch.Tensor, where: str
) -> CompressedMerge:
    """decompress(parts) + ΔW compressed back into the same scheme, with the survival figures of D = the change
    the new stored tensors carry (see lorasurgeon.fp8_merge.Fp8Merge).

    Each scale group (tensor, channel, group or block) keeps its stored scale and zero point, or takes fresh
    min-max ones, whichever stores its W + ΔW closer (the stored ones on ties). Fresh qparams alone re-round
    every value onto a new grid: for int4 groups of 16 and ‖ΔW‖ = 1% of ‖W‖ that noise is ~7 ‖ΔW‖, and even
    ΔW = 0 changes the weights (the library's symmetric int scale amax / 7.5 or / 127.5 does not reproduce
    a stored grid)."""
    compressor, args = _compressor(scheme, where)
    old = _decompressed(parts, scheme, where)
    base = old["weight"]
    if base.shape != delta.shape:
        raise InputError(f"{where}: ΔW is {list(delta.shape)} but the compressed weight is {list(base.shape)}")
    target = base + delta
    stored = (parts["weight_scale"], old.get("weight_zero_point"))
    fresh = _fresh(target, args.weights, parts["weight_scale"].dtype, where)
    misses = []
    for scale, zero_point in (stored, fresh):
        trial = _compress(compressor, args, target, scale, zero_point, parts, where)
        again = _decompressed({**parts, **trial}, scheme, where)["weight"]
        misses.append(_reduce((again - target).square(), args.weights, "sum"))
    keep = misses[0] <= misses[1]  # shaped like the scale; NaN takes the fresh qparams, which show it
    scale = torch.where(keep, stored[0], fresh[0])
    zero_point = None if stored[1] is None else torch.where(keep, stored[1].to(fresh[1].dtype), fresh[1])
    tensors = _compress(compressor, args, target, scale, zero_point, parts, where)
    change = _decompressed({**parts, **tensors}, scheme, where)["weight"].sub_(base)
    wanted = float(torch.linalg.vector_norm(delta))
    got = float(torch.linalg.vector_norm(change))
    missed = float(torch.linalg.vector_norm(change.sub_(delta)))
    finite = all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())
    if wanted == 0:
        return CompressedMerge(tensors, *((1.0, 0.0) if got == 0 else (math.inf, math.inf)), finite)
    return CompressedMerge(tensors, got / wanted, missed / wanted, finite)


def _decompressed(parts: Mapping[str, torch.Tensor], scheme: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The library's decompressed state: fp32 `weight`, and `weight_zero_point` unpacked where it was packed."""
    compressor, args = _compressor(scheme, where)
    state = {name: parts[name] for name in compressor.compression_param_names(args) if name in parts}
    state["weight_scale"] = state["weight_scale"].to(torch.float32)
    out: dict[str, torch.Tensor] = compressor.decompress(state, args)
    out["weight"] = out["weight"].to(torch.float32)
    return out


def _fresh(weight: torch.Tensor, args: Any, dtype: torch.dtype, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams of fp32 `weight` by the library's formula, the scale rounded to the stored `dtype`."""
    from compressed_tensors.quantization.utils import calculate_qparams

    scale, zero_point = calculate_qparams(_reduce(weight, args, "amin"), _reduce(weight, args, "amax"), args)
    return scale.to(dtype), zero_point


def _compress(
    compressor: Any,
    args: Any,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    like: Mapping[str, torch.Tensor],
    where: str,
) -> dict[str, torch.Tensor]:
    """The library's compression of `weight` on the given qparams, checked against the stored layout `like`."""
    state = {"weight": weight.to(torch.float32), "weight_scale": scale}
    if not args.weights.symmetric and zero_point is not None:
        state["weight_zero_point"] = zero_point
    out = compressor.compress(state, args)
    result = {name: out[name] for name in like if name in out and name != "weight_shape"}
    for name, tensor in result.items():
        if tensor.shape != like[name].shape or tensor.dtype != like[name].dtype:
            raise InputError(
                f"{where}: re-compressing gives {name} {tensor.dtype}{list(tensor.shape)} where the checkpoint "
                f"stores {like[name].dtype}{list(like[name].shape)}; its scheme does not describe it"
            )
    return result


def _compressor(scheme: Mapping[str, Any], where: str) -> tuple[Any, Any]:
    """(the library's compressor class for the scheme's format, its QuantizationScheme of the weights alone)."""
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    except ImportError:
        raise UnsupportedError(MISSING.format(where=where)) from None
    import pydantic

    try:
        weights = QuantizationArgs.model_validate(scheme.get("weights") or {})
    except pydantic.ValidationError as e:
        raise InputError(f"{where}: config group weights {scheme.get('weights')!r} are not valid: {e}") from None
    fmt = str(scheme.get("format"))
    args = QuantizationScheme(targets=["Linear"], weights=weights, format=fmt)
    return BaseCompressor.get_value_from_registry(fmt), args


def _reduce(weight: torch.Tensor, args: Any, op: str) -> torch.Tensor:
    """`op` ("amin", "amax" or "sum") of `weight` (out, in) over each scale's elements, shaped like the scale the
    scheme stores: tensor (1,), channel (out, 1), group (out, in / g), block (⌈out/bm⌉, ⌈in/bn⌉), the last
    zero padded (qparams always include 0, so padding changes no min-max)."""
    if weight.dim() != 2:
        raise UnsupportedError(f"compressed weights of {weight.dim()} dims are not re-compressed yet")
    strategy = str(args.strategy)
    if strategy == "tensor":
        return getattr(weight, op)().reshape(1)  # type: ignore[no-any-return]
    if strategy == "channel":
        return getattr(weight, op)(dim=1, keepdim=True)  # type: ignore[no-any-return]
    if strategy == "group":
        size = int(args.group_size)
        if weight.shape[1] % size:
            raise UnsupportedError(f"{weight.shape[1]} columns are not a whole number of groups of {size}")
        return getattr(weight.reshape(weight.shape[0], -1, size), op)(dim=-1)  # type: ignore[no-any-return]
    if strategy == "block":
        bm, bn = (int(b) for b in args.block_structure)
        m, n = weight.shape
        padded = F.pad(weight, (0, -n % bn, 0, -m % bm))
        blocks = padded.reshape(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn)
        return getattr(blocks, op)(dim=(1, 3))  # type: ignore[no-any-return]
    raise UnsupportedError(f"compressed-tensors strategy {strategy!r} is not re-compressed by lorasurgeon")
