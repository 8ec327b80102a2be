"""One quantized weight, merged in its own format or dequantized: the per-tensor call a merge makes for every
weight that formats/quantization.py lists in `Quantization.weights`.

The caller reads the weight's stored tensors (`QuantizedWeight.parts`, local name -> checkpoint name; they may
sit in different shards) and passes them by local name. Dispatches to lorasurgeon.fp8_merge (maths) for "fp8-block"
and to lorasurgeon.compressed (the compressed-tensors library) for "compressed-tensors".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lorasurgeon import compressed, fp8, fp8_merge
from lorasurgeon.quantized import QuantizedWeight


@dataclass(frozen=True)
class Requantized:
    """The new data of a merged quantized weight, by checkpoint tensor name (exactly the weight's `rewritten`
    parts; its other parts are copied as they are), and how much of ΔW it carries (lorasurgeon.fp8_merge.Fp8Merge)."""

    tensors: dict[str, torch.Tensor]
    survival: float
    error: float
    finite: bool


def merge_in_format(
    weight: QuantizedWeight, parts: Mapping[str, torch.Tensor], delta: torch.Tensor | fp8.DeltaRows, where: str
) -> Requantized:
    """deq(parts) + ΔW stored back in the weight's format, same tensor names, dtypes and shapes. `delta` is the
    fp32 ΔW shaped like `weight.shape` (not modified), or for FP8 blocks a function of its rows (see
    fp8_merge.merge_fp8_block); `where` names the checkpoint in errors."""
    if weight.method == "fp8-block":
        assert weight.block is not None  # set for every fp8-block weight by formats/fp8_block.py
        merged = fp8_merge.merge_fp8_block(
            parts["weight"], parts["weight_scale_inv"], delta, weight.block, weight.power_of_two
        )
        local = {"weight": merged.q, "weight_scale_inv": merged.scale_inv}
        survival, error, finite = merged.survival, merged.error, merged.finite
    else:
        assert weight.scheme is not None
        assert isinstance(delta, torch.Tensor)  # the library takes whole weights
        packed = compressed.merge_compressed(parts, weight.scheme, delta, f"{where}: {weight.name}")
        local, survival, error, finite = packed.tensors, packed.survival, packed.error, packed.finite
    return Requantized({weight.parts[name]: local[name] for name in weight.rewritten}, survival, error, finite)


def dequantize(
    weight: QuantizedWeight,
    parts: Mapping[str, torch.Tensor],
    delta: torch.Tensor | None,
    dtype: torch.dtype,
    where: str,
) -> torch.Tensor:
    """The float weight (to be written as `weight.name`): deq(parts) (+ ΔW) in fp32, rounded once to `dtype`.
    The `--dtype` route out of the quantized format (its companions are then dropped)."""
    if weight.method == "fp8-block":
        assert weight.block is not None
        return fp8.dequantized(parts["weight"], parts["weight_scale_inv"], weight.block, delta, dtype)
    assert weight.scheme is not None
    exact = compressed.decompress(parts, weight.scheme, f"{where}: {weight.name}")
    if delta is not None:
        exact.add_(delta)
    return exact.to(dtype)
