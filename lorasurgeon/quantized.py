"""The nouns of quantized checkpoints: a quantized weight and its stored parts, and a checkpoint's quantization.

The normal form, as adapter.py is for adapters: formats/quantization.py (`detect_quantization`) makes them from
headers, requant.py merges one weight. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal[
    "fp8-block", "compressed-tensors", "bitsandbytes-4bit", "bitsandbytes-8bit", "gptq", "awq", "gptq-or-awq",
    "hqq", "mxfp4", "gguf", "aqlm", "auto-round", "bitnet", "eetq", "fbgemm-fp8", "fp-quant", "higgs", "modelopt",
    "mxfp8", "nvfp4", "quanto", "quark", "spqr", "torchao", "vptq", "sinq", "comfy-scaled-fp8", "unknown",
]  # fmt: skip


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight: the float weight `name` an adapter's ΔW lands on, and the stored tensors it is made of.

    `parts` maps local names (as the format calls them: "weight", "weight_scale_inv", "weight_packed", ...) to
    checkpoint tensor names, which may live in different shards. A merge in format writes new data for the
    local names in `rewritten` under the same names and copies the other parts byte for byte.
    """

    name: str
    shape: tuple[int, ...]
    parts: Mapping[str, str]
    rewritten: tuple[str, ...]
    method: Literal["fp8-block", "compressed-tensors"]
    block: tuple[int, int] | None = None  # fp8-block: rows × columns per scale ((m, n): one scale per tensor)
    power_of_two: bool = False  # fp8-block: scale_fmt "ue8m0"
    group: str | None = None  # compressed-tensors: the config group whose scheme this weight follows
    scheme: Mapping[str, Any] | None = None  # compressed-tensors: that group, as config.json has it


@dataclass(frozen=True)
class Quantization:
    """What a checkpoint's quantization is and what lorasurgeon can do with it.

    `refusal` is the one sentence (naming the file and the method, saying what works) for a merge lorasurgeon
    cannot do; None when every quantized weight in `weights` can be merged in format and dequantized.
    `companions` are every tensor of the quantization that is not a float weight (scales, zero points, packed
    values, kv-cache scales): never merge targets, and dropped by a dequantizing `--dtype`.
    """

    method: Method
    label: str
    config: Mapping[str, Any] | None
    weights: Mapping[str, QuantizedWeight] = field(default_factory=dict)
    companions: frozenset[str] = frozenset()
    refusal: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizedPart:
    """A plan step that writes one stored tensor of a quantized weight: `part` (a local name of `weight.parts`)
    merged in format, or with `dequantize` the float weight itself (written under `weight.name`, its companions
    dropped)."""

    weight: QuantizedWeight
    part: str
    dequantize: bool = False
