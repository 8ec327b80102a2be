"""compressed-tensors checkpoints (config.json `quant_method: "compressed-tensors"`, as llm-compressor writes them):
which config group quantizes each module, the module's stored tensors, and which schemes lorasurgeon re-compresses.
Header-only and torch-free; the compression itself is lorasurgeon.compressed (the compressed-tensors library).

quantization_config: {"config_groups": {name: {"targets": [...], "weights": {...}, "input_activations": ...,
"format": ...}}, "ignore": [...], "format": ..., "quantization_status": "compressed", "kv_cache_scheme": ...,
"sparsity_config": {}, "transform_config": {}}. Targets and ignore entries are module names, "re:" regexes
(re.match) or class names ("Linear"); the most specific match wins (exact name, regex, class), as in
compressed_tensors.utils.match.match_targets. Class names cannot be checked without the model: they match any
module whose stored tensors are quantized.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lorasurgeon.errors import InputError
from lorasurgeon.header import TensorInfo
from lorasurgeon.quantized import Quantization, QuantizedWeight

# format -> (the stored tensor holding the values, their dtypes, the weight args lorasurgeon re-compresses)
FORMATS: dict[str, tuple[str, frozenset[str], frozenset[tuple[str, int]]]] = {
    "float-quantized": ("weight", frozenset({"F8_E4M3"}), frozenset({("float", 8)})),
    "int-quantized": ("weight", frozenset({"I8"}), frozenset({("int", 8)})),
    "naive-quantized": ("weight", frozenset({"F8_E4M3", "I8"}), frozenset({("float", 8), ("int", 8)})),
    "pack-quantized": ("weight_packed", frozenset({"I32"}), frozenset(("int", b) for b in range(1, 9))),
}
STRATEGIES = frozenset({"tensor", "channel", "group", "block"})
KEPT = ("weight_shape", "input_scale", "input_zero_point", "output_scale", "output_zero_point")
KV_SCALES = (".k_scale", ".v_scale", ".q_scale")
COMPRESSED = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_global_scale", ".weight_g_idx")
STATIC_WARNING = (
    "{where}: static input scales ({name}) were calibrated on the base model's activations; they are kept as "
    "they are, and inputs changed by the merge past their range are clipped at run time"
)


def compressed_quantization(qc: Mapping[str, Any], tensors: Mapping[str, TensorInfo], where: str) -> Quantization:
    """Every compressed module of a compressed-tensors checkpoint with its group and stored tensors.
    InputError when a module misses a tensor its scheme stores, or holds compressed tensors no group targets;
    a scheme lorasurgeon does not compress back goes into `refusal`."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise InputError(f"{where}: config.json quantization_config.config_groups must map names to schemes")
    formats = {g: _format(scheme, qc.get("format")) for g, scheme in groups.items()}
    refusal = _config_refusal(qc, where) or next(
        (r for g in groups if (r := _scheme_refusal(g, groups[g], formats[g], where))), None
    )
    weights: dict[str, QuantizedWeight] = {}
    for name, info in sorted(tensors.items()):
        module, _, local = name.rpartition(".")
        group = _group_of(module, groups, qc.get("ignore") or [])
        layout = FORMATS.get(formats[group]) if group is not None else None
        if group is None or layout is None or local != layout[0] or info.dtype not in layout[1]:
            continue
        if f"{module}.weight_g_idx" in tensors and refusal is None:
            refusal = _scheme_refusal(group, {**groups[group], "weights": {"actorder": "group"}}, "", where)
        scheme = {**groups[group], "format": formats[group]}  # the format resolved, for the compressor
        weights[f"{module}.weight"] = _weight(module, info, group, scheme, tensors)
    companions = {p for w in weights.values() for p in w.parts.values() if p != w.name}
    companions |= {n for n in tensors if n.endswith(KV_SCALES) and qc.get("kv_cache_scheme")}
    stray = sorted(n for n in tensors if n.endswith(COMPRESSED) and n not in companions)
    if stray and refusal is None:
        raise InputError(
            f"{tensors[stray[0]].path}: {stray[0]!r} is a compressed-tensors tensor of no module "
            "that a config group of config.json targets"
        )
    static = [w.parts["input_scale"] for w in weights.values() if "input_scale" in w.parts]
    warnings = (STATIC_WARNING.format(where=where, name=static[0]),) if static else ()
    label = "compressed-tensors " + ", ".join(sorted({_describe(groups[g], formats[g]) for g in groups}))
    return Quantization("compressed-tensors", label, qc, weights, frozenset(companions), refusal, warnings)


def weight_args(scheme: Mapping[str, Any]) -> dict[str, Any]:
    """A scheme's weight args with the defaults and the strategy compressed-tensors infers when it is unset
    (group_size None: tensor; > 0: group; -1: channel)."""
    args = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": None}
    args.update(scheme.get("weights") or {})
    if args["strategy"] is None:
        size = args["group_size"]
        args["strategy"] = "tensor" if size is None else "channel" if size == -1 else "group"
    return args


def _weight(
    module: str, info: TensorInfo, group: str, scheme: Mapping[str, Any], tensors: Mapping[str, TensorInfo]
) -> QuantizedWeight:
    args = weight_args(scheme)
    root = info.name.rpartition(".")[2]
    wanted = [root, "weight_scale"] + (["weight_shape"] if root == "weight_packed" else [])
    wanted += [] if args["symmetric"] else ["weight_zero_point"]
    for local in wanted:
        if f"{module}.{local}" not in tensors:
            raise InputError(
                f"{info.path}: {info.name!r} is compressed with config group {group!r}, which stores "
                f"{module}.{local}, but no shard holds it"
            )
    parts = {local: f"{module}.{local}" for local in wanted}
    parts.update({local: f"{module}.{local}" for local in KEPT if f"{module}.{local}" in tensors})
    shape = info.shape
    if root == "weight_packed":  # exact value in weight_shape (data); the header gives it up to 32/bits columns
        shape = (*info.shape[:-1], info.shape[-1] * 32 // int(args["num_bits"]))
    rewritten = tuple(local for local in wanted if local != "weight_shape")
    return QuantizedWeight(
        f"{module}.weight", shape, parts, rewritten, "compressed-tensors", group=group, scheme=scheme
    )


def _group_of(module: str, groups: Mapping[str, Mapping[str, Any]], ignore: list[str]) -> str | None:
    """The config group whose targets match `module` most specifically, None when ignored or untargeted."""
    if not module or any(_rank(module, target) < 2 for target in ignore):
        return None
    ranked = [(_rank(module, t), i, g) for i, (g, s) in enumerate(groups.items()) for t in s.get("targets") or []]
    ranked = [r for r in ranked if r[0] < 3]
    return min(ranked)[2] if ranked else None


def _rank(module: str, target: str) -> int:
    """0 exact name, 1 regex, 2 a class name (cannot be checked from names), 3 no match."""
    if target.startswith("re:"):
        return 1 if re.match(target[3:], module) else 3
    if target == module:
        return 0
    return 2 if target[:1].isupper() and "." not in target else 3


def _format(scheme: Mapping[str, Any], default: str | None) -> str:
    """The group's compression format; inferred like compressed-tensors' infer_module_format when unset."""
    fmt = scheme.get("format") or (default if default not in (None, "mixed-precision") else None)
    if fmt:
        return str(fmt)
    args, inputs = weight_args(scheme), scheme.get("input_activations")
    if args["type"] == "int":
        floats = inputs is not None and inputs.get("type") == "float"
        return "int-quantized" if inputs is not None and not floats else "pack-quantized"
    return "float-quantized" if inputs is not None else "naive-quantized"


def _config_refusal(qc: Mapping[str, Any], where: str) -> str | None:
    status = qc.get("quantization_status", "compressed")
    for key, bad in (("sparsity_config", qc.get("sparsity_config")), ("transform_config", qc.get("transform_config"))):
        if bad:
            return f"{where}: compressed-tensors with a {key} (sparse or rotated weights) cannot be merged into exactly"
    if status != "compressed":
        return f"{where}: compressed-tensors quantization_status {status!r}: only 'compressed' checkpoints are read"
    return None


def _scheme_refusal(group: str, scheme: Mapping[str, Any], fmt: str, where: str) -> str | None:
    """Why a group's weights cannot be decompressed and compressed back exactly by lorasurgeon, or None."""
    if fmt == "dense":
        return None
    args = weight_args(scheme)
    supported = fmt in FORMATS and (str(args["type"]), int(args["num_bits"])) in FORMATS[fmt][2]
    supported = supported and args["strategy"] in STRATEGIES and not args.get("dynamic")
    # scale_dtype: microscaled (MX) scales; actorder "group": activation-ordered groups (weight_g_idx)
    supported = supported and not args.get("scale_dtype") and args.get("actorder") != "group"
    if supported:
        return None
    return (
        f"{where}: config group {group!r} is compressed as {_describe(scheme, fmt)}, a scheme lorasurgeon does "
        "not compress back; merge into the original 16-bit model instead"
    )


def _describe(scheme: Mapping[str, Any], fmt: str) -> str:
    args = weight_args(scheme)
    size = f" {args['group_size']}" if args["strategy"] == "group" else ""
    sym = "" if args["symmetric"] else " asymmetric"
    order = f" actorder {args['actorder']}" if args.get("actorder") else ""
    return f"{args['type']}{args['num_bits']} {args['strategy']}{size}{sym}{order} ({fmt})"
