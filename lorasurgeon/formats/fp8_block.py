"""FP8 block-quantized checkpoints (config.json `quant_method: "fp8"`, transformers' FineGrainedFP8Config, as
DeepSeek-V3/R1, Kimi-K2 and Qwen3-FP8 ship): each F8_E4M3 weight, its `weight_scale_inv` and the block size.
Header-only and torch-free; the maths is lorasurgeon.fp8.

The config, as DeepSeek writes it: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]} (+ "scale_fmt": "ue8m0" from V3.1 on); transformers adds "dequantize",
"modules_to_not_convert", "modules_to_convert", "expert_dtype". `weight_block_size: null` means one scale
per tensor. A weight T's scale is T + "_scale_inv" (`x.weight` -> `x.weight_scale_inv`, fused experts
`experts.gate_up_proj` -> `experts.gate_up_proj_scale_inv`), or `x.scale` / `x.qscale_weight`, the names
transformers renames to weight_scale_inv (DeepSeek-V4-Flash, Mistral Large 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lorasurgeon.errors import InputError
from lorasurgeon.header import TensorInfo
from lorasurgeon.quantized import Quantization, QuantizedWeight

FP8 = "F8_E4M3"
SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})
RENAMED_SCALES = ("scale", "qscale_weight")  # beside `<module>.weight`
ACTIVATION_SCALES = ("activation_scale", "input_scale")
STATIC_WARNING = (
    "{where}: static activation scales ({name}) were calibrated on the base model's activations; they are kept "
    "as they are, and inputs changed by the merge past their range are clipped at run time"
)


def fp8_quantization(qc: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo], where: str) -> Quantization:
    """The FP8 block quantization of a checkpoint: every F8_E4M3 weight with its scale (InputError when one has
    none, or a scale's grid does not fit its weight and block). `qc` is config.json's quantization_config, or
    None: the block size is then inferred from the shapes (`infer_block`), or refused when they leave it open."""
    scales = frozenset(n for n in tensors if n.endswith(("_scale_inv", *ACTIVATION_SCALES)))
    refusal = _refusal(qc, tensors, where)
    if refusal is not None:
        return Quantization("fp8-block", "FP8", qc, companions=scales, refusal=refusal)
    pairs = _pairs(tensors)
    block = _configured_block(qc, where) if qc is not None else None
    if qc is None and any(math.prod(tensors[scale].shape) != 1 for scale in pairs.values()):
        block = infer_block([(tensors[w].shape, tensors[s].shape) for w, s in pairs.items()])
        if block is None:
            refusal = (
                f"{where}: holds FP8 weights with block scales but no config.json says the block size, and their "
                "shapes leave it open; open the model directory that holds its config.json"
            )
            return Quantization("fp8-block", "FP8", qc, companions=scales, refusal=refusal)
    power_of_two = qc is not None and qc.get("scale_fmt") == "ue8m0"
    weights = {w: _weight(tensors[w], tensors[s], block, power_of_two, tensors) for w, s in sorted(pairs.items())}
    companions = frozenset(part for w in weights.values() for local, part in w.parts.items() if local != "weight")
    static = [w.parts[a] for w in weights.values() for a in ACTIVATION_SCALES if a in w.parts]
    warnings = (STATIC_WARNING.format(where=where, name=static[0]),) if static else ()
    label = f"FP8 e4m3 with {block[0]}×{block[1]} block scales" if block else "FP8 e4m3 with per-tensor scales"
    return Quantization("fp8-block", label, qc, weights, companions, None, warnings)


def infer_block(shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[int, int] | None:
    """The one power-of-two block (bm, bn) whose grid ⌈m/bm⌉ × ⌈n/bn⌉ every (weight shape, scale shape) pair
    has, or None when none or several fit. ⌈size/b⌉ = cells ⇔ size/cells ≤ b < size/(cells − 1)."""
    block = []
    for axis in (-2, -1):
        low, high = 1, math.inf
        for weight, scale in shapes:
            cells = scale[axis] if len(scale) == len(weight) else 0
            if cells <= 0:
                return None
            low = max(low, -(-weight[axis] // cells))
            if cells > 1:
                high = min(high, -(-weight[axis] // (cells - 1)) - 1)
        powers = [2**k for k in range(21) if low <= 2**k <= high]
        if len(powers) != 1:
            return None
        block.append(powers[0])
    return block[0], block[1]


def _pairs(tensors: Mapping[str, TensorInfo]) -> dict[str, str]:
    """weight name -> scale name for every F8_E4M3 tensor; InputError for one without a scale, and for a
    `*_scale_inv` whose weight is missing or not F8_E4M3."""
    pairs: dict[str, str] = {}
    for name, info in tensors.items():
        if name.endswith("_scale_inv"):
            weight = tensors.get(name.removesuffix("_scale_inv"))
            if weight is None or weight.dtype != FP8:
                what = f"is {weight.dtype}, not F8_E4M3" if weight else "is in no shard"
                raise InputError(
                    f"{info.path}: scale {name!r} has no FP8 weight: {name.removesuffix('_scale_inv')!r} {what}"
                )
        if info.dtype != FP8:
            continue
        module = name.removesuffix(".weight")
        candidates = [f"{name}_scale_inv"] + ([f"{module}.{s}" for s in RENAMED_SCALES] if module != name else [])
        scale = next((c for c in candidates if c in tensors), None)
        if scale is None:
            raise InputError(
                f"{info.path}: FP8 weight {name!r} has no scale tensor {candidates[0]!r} (in any shard), so its "
                "values cannot be read back"
            )
        pairs[name] = scale
    return pairs


def _weight(
    info: TensorInfo,
    scale: TensorInfo,
    block: tuple[int, int] | None,
    power_of_two: bool,
    tensors: Mapping[str, TensorInfo],
) -> QuantizedWeight:
    """One FP8 weight; InputError when its scale is not a float grid of the block's shape."""
    name = info.name
    if len(info.shape) < 2:
        raise InputError(f"{info.path}: FP8 weight {name!r} has shape {list(info.shape)}; block scales need 2 dims")
    if scale.dtype not in SCALE_DTYPES:
        raise InputError(f"{scale.path}: scale {scale.name!r} is {scale.dtype}; FP8 block scales are F32, BF16 or F16")
    own = block or (info.shape[-2], info.shape[-1])
    *lead, m, n = info.shape
    grid = (*lead, -(-m // own[0]), -(-n // own[1]))
    if scale.shape != grid and not (math.prod(grid) == 1 == math.prod(scale.shape)):
        raise InputError(
            f"{scale.path}: scale {scale.name!r} has shape {list(scale.shape)} but weight {name!r} "
            f"{list(info.shape)} in {own[0]}×{own[1]} blocks needs {list(grid)}"
        )
    module = name.removesuffix(".weight")
    parts = {"weight": name, "weight_scale_inv": scale.name}
    parts.update({local: f"{module}.{local}" for local in ACTIVATION_SCALES if f"{module}.{local}" in tensors})
    return QuantizedWeight(
        name, info.shape, parts, ("weight", "weight_scale_inv"), "fp8-block", own, power_of_two=power_of_two
    )


def _configured_block(qc: Mapping[str, Any], where: str) -> tuple[int, int] | None:
    block = qc.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise InputError(
            f"{where}: config.json quantization_config.weight_block_size must be two positive integers, not {block!r}"
        )
    return block[0], block[1]


def _refusal(qc: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo], where: str) -> str | None:
    """Why an FP8 checkpoint cannot be merged in format (a variant of the format we do not write), or None."""
    qc = qc or {}
    settings = {"fmt": ("e4m3", None), "scale_fmt": ("float", "ue8m0", None), "expert_dtype": ("fp8", None)}
    for key, allowed in settings.items():
        if qc.get(key) not in allowed:
            return (
                f"{where}: is quantized with FP8 blocks in a variant lorasurgeon does not write "
                f"(quantization_config.{key} {qc.get(key)!r}); merge into the original 16-bit model instead"
            )
    packed = sorted(n for n, i in tensors.items() if n.endswith("_scale_inv") and i.dtype in ("U8", "I8"))
    if packed:
        return (
            f"{where}: has 1-byte (e8m0) scales ({packed[0]!r}), MXFP8-style, which lorasurgeon does not write; "
            "merge into the original 16-bit model instead"
        )
    return None
