"""A quantized base in the plan, from headers: what formats/quantization.py detects, the refusal of every method
lorasurgeon cannot merge into exactly, the float weights adapters name (a compressed-tensors `weight_packed`
stands for a `weight` the file does not hold), and the route of each stored tensor through the merge.

Merged in format (FP8 blocks, compressed-tensors), a quantized weight's rewritten parts (values and scales, which
may sit in different shards) are each a step carrying the weight's terms; its other parts are copied. With a
float `--dtype` every quantized weight is dequantized into `<module>.weight`, its companions are dropped, and the
output config.json loses `quantization_config`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding
from lorasurgeon.formats.quantization import detect_quantization
from lorasurgeon.header import TensorInfo
from lorasurgeon.quantized import Quantization, QuantizedPart, QuantizedWeight

Action = Literal["part", "drop"]
# The stored tensor holding a quantized weight's values, per format (the one a dequantized weight replaces).
VALUES = ("weight", "weight_packed")


@dataclass(frozen=True)
class Route:
    """What the merge does with one stored tensor of a quantized weight: writes it as a `part` step (`tensor` is
    what the step writes: the stored tensor, or the float weight when dequantized), or drops it."""

    action: Action
    part: QuantizedPart | None = None
    tensor: TensorInfo | None = None


@dataclass(frozen=True)
class QuantizedBase:
    """A base's quantization as the plan uses it; `dequantize` when a float --dtype leaves the format."""

    quantization: Quantization
    dequantize: bool
    parts: Mapping[str, tuple[QuantizedWeight, str]]  # stored tensor -> (its weight, its local name)

    def logical(self, tensors: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Every quantized weight as the float tensor adapters resolve against (its logical shape; a
        compressed-tensors `weight_packed` or int8 `weight` stands for it), its values read through its parts."""
        return {
            weight.name: weight_info(weight, tensors[weight.parts[_values(weight)]])
            for weight in self.quantization.weights.values()
        }

    def route(self, info: TensorInfo, changed: Collection[str]) -> Route | None:
        """The route of stored tensor `info` when the adapters change the weights `changed` (None: no part of a
        quantized weight, or copied as it is: an untouched weight merged in format, a part the format keeps)."""
        name = info.name
        if name in self.quantization.companions and name not in self.parts:
            return Route("drop") if self.dequantize else None
        found = self.parts.get(name)
        if found is None:
            return None
        weight, local = found
        if self.dequantize:
            if local != _values(weight):
                return Route("drop")
            return Route("part", QuantizedPart(weight, local, True), weight_info(weight, info))
        if weight.name in changed and local in weight.rewritten:
            return Route("part", QuantizedPart(weight, local), info)
        return None

    def config(self, config: dict[str, Any] | None) -> dict[str, Any] | None:
        """The output config.json: without quantization_config when dequantized (None: the base's)."""
        if not self.dequantize or config is None:
            return None
        return {k: v for k, v in config.items() if k != "quantization_config"}


def quantized_base(base: Checkpoint, dtype: str | None) -> tuple[QuantizedBase | None, list[Finding]]:
    """The base's quantization for the plan (None: unquantized, or refused) and the findings it gives: the
    refusal of a method lorasurgeon cannot merge into, warnings about static activation scales."""
    where = str(base.path)
    quantization = detect_quantization(base.config, base.tensors, where)
    if quantization is None:
        return None, []
    if quantization.refusal is not None:
        return None, [Finding.of("error", quantization.refusal)]
    findings = [Finding.of("warning", text) for text in quantization.warnings]
    if dtype is not None and dtype not in ("F32", "BF16", "F16"):
        findings.append(Finding.of("error", f"{where}: a quantized base is dequantized only to fp32, bf16 or fp16"))
    parts = {stored: (w, local) for w in quantization.weights.values() for local, stored in w.parts.items()}
    return QuantizedBase(quantization, dtype is not None, parts), findings


def weight_info(weight: QuantizedWeight, stored: TensorInfo) -> TensorInfo:
    """A quantized weight as a float tensor of its logical shape (its bytes are its parts')."""
    numel = 1
    for size in weight.shape:
        numel *= size
    return stored._replace(name=weight.name, dtype="F32", shape=tuple(weight.shape), numel=numel)


def _values(weight: QuantizedWeight) -> str:
    return next(local for local in VALUES if local in weight.parts)
