"""Quantized checkpoints: the method, which tensors are quantized weights and which are their companions, and for
every method lorasurgeon cannot merge into exactly, the sentence that refuses it. Header-only and torch-free.

Read from config.json's `quantization_config` (as transformers, llm-compressor and DeepSeek write it) and, where
there is none, from tensor names and dtypes (`NAME_SIGNS`). Two methods merge in format: "fp8-block"
(`quant_method: "fp8"`: an F8_E4M3 `weight` and its `weight_scale_inv`, see lorasurgeon.fp8) and
"compressed-tensors" (see formats/compressed_checkpoint.py). A quantized weight's companions are never weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lorasurgeon.errors import InputError
from lorasurgeon.formats.compressed_checkpoint import compressed_quantization
from lorasurgeon.formats.fp8_block import fp8_quantization
from lorasurgeon.header import TensorInfo
from lorasurgeon.quantized import Method, Quantization

# config.json quantization_config.quant_method -> Method (bitsandbytes splits on load_in_4bit / load_in_8bit).
CONFIG_METHODS: dict[str, Method] = {
    "fp8": "fp8-block", "compressed-tensors": "compressed-tensors", "gptq": "gptq", "awq": "awq", "hqq": "hqq",
    "mxfp4": "mxfp4", "gguf": "gguf", "aqlm": "aqlm", "auto-round": "auto-round", "bitnet": "bitnet",
    "eetq": "eetq", "fbgemm_fp8": "fbgemm-fp8", "fp_quant": "fp-quant", "higgs": "higgs", "modelopt": "modelopt",
    "mxfp8": "mxfp8", "nvfp4": "nvfp4", "quanto": "quanto", "quark": "quark", "spqr": "spqr", "torchao": "torchao",
    "vptq": "vptq", "sinq": "sinq",
}  # fmt: skip

# Tensor-name endings that give a method away when no config.json says it; the first match decides.
NAME_SIGNS: tuple[tuple[str, Method], ...] = (
    (".weight.absmax", "bitsandbytes-4bit"), (".weight.quant_map", "bitsandbytes-4bit"),
    (".weight.quant_state.bitsandbytes__nf4", "bitsandbytes-4bit"),
    (".weight.quant_state.bitsandbytes__fp4", "bitsandbytes-4bit"), (".SCB", "bitsandbytes-8bit"),
    (".g_idx", "gptq"), (".qweight", "gptq-or-awq"), (".qzeros", "gptq-or-awq"), (".W_q", "hqq"),
    ("_blocks", "mxfp4"), (".weight_packed", "compressed-tensors"), (".weight_scale_inv", "fp8-block"),
    (".weight_global_scale", "compressed-tensors"), (".weight_scale", "compressed-tensors"),
    (".scale_weight", "comfy-scaled-fp8"),
)  # fmt: skip

LABELS: dict[Method, str] = {
    "bitsandbytes-4bit": "bitsandbytes 4-bit (NF4/FP4)", "bitsandbytes-8bit": "bitsandbytes 8-bit (LLM.int8)",
    "gptq": "GPTQ", "awq": "AWQ", "gptq-or-awq": "GPTQ/AWQ-style packed integers (qweight/qzeros/scales)",
    "hqq": "HQQ", "mxfp4": "MXFP4 (gpt-oss *_blocks/*_scales)", "gguf": "GGUF", "aqlm": "AQLM",
    "auto-round": "AutoRound", "bitnet": "BitNet", "eetq": "EETQ", "fbgemm-fp8": "FBGEMM FP8",
    "fp-quant": "FP-Quant", "higgs": "HIGGS", "modelopt": "NVIDIA ModelOpt", "mxfp8": "MXFP8", "nvfp4": "NVFP4",
    "quanto": "optimum-quanto", "quark": "AMD Quark", "spqr": "SpQR", "torchao": "torchao", "vptq": "VPTQ",
    "sinq": "SINQ", "comfy-scaled-fp8": "ComfyUI scaled fp8 (scale_weight)", "unknown": "an unknown method",
}  # fmt: skip

ORIGINAL = "merge into the original 16-bit model it was quantized from instead (and quantize the result again)"
REMEDIES: dict[Method, str] = {
    "mxfp4": f"{ORIGINAL}, or dequantize it first (transformers: Mxfp4Config(dequantize=True), then save_pretrained)",
    "gguf": "merge into the safetensors model it was converted from and convert the result again, or apply the "
    "adapter at run time (llama.cpp --lora)",
}
QLORA_README = "The following `bitsandbytes` quantization config was used during training:"  # PEFT < 0.7 cards
QUANTIZED_NAME_WORDS = (
    "bnb",
    "4bit",
    "8bit",
    "nf4",
    "gptq",
    "awq",
    "int4",
    "int8",
    "fp8",
    "gguf",
    "hqq",
    "exl2",
    "w4a16",
    "w8a8",
    "nvfp4",
    "mxfp4",
)


def detect_quantization(
    config: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo], where: str
) -> Quantization | None:
    """The quantization of a checkpoint from its config.json (None if it has none) and tensor headers, or None
    for an unquantized one (plain fp8 casts without scales included). `where` names the checkpoint in
    messages. Raises InputError for an inconsistent one (a quantized weight without its scale, a scale
    shaped for another block); an unsupported method is not raised but described in `refusal`.
    """
    qc = config.get("quantization_config") if config is not None else None
    if qc is not None and not isinstance(qc, dict):
        raise InputError(f"{where}: config.json field 'quantization_config' must be an object, not {qc!r}")
    method, evidence = _method_of(qc, tensors)
    if method is None:
        return None
    if method == "fp8-block":
        return fp8_quantization(qc, tensors, where)
    if method == "compressed-tensors" and qc is not None:
        return compressed_quantization(qc, tensors, where)
    if method == "compressed-tensors":
        refusal = (
            f"{where}: holds compressed-tensors tensors ({evidence}) but no config.json quantization_config says "
            "how they were made; open the model directory that holds its config.json"
        )
        return Quantization(method, "compressed-tensors", None, companions=_companions(tensors), refusal=refusal)
    return Quantization(
        method, LABELS[method], qc, companions=_companions(tensors), refusal=method_refusal(method, where, evidence)
    )


def method_refusal(method: Method, where: str, evidence: str) -> str:
    """The sentence refusing to merge into a checkpoint quantized with `method` (`evidence`: how we know)."""
    remedy = REMEDIES.get(method, ORIGINAL)
    return (
        f"{where}: is quantized with {LABELS[method]} ({evidence}), whose packed weights lorasurgeon cannot merge "
        f"into exactly; {remedy}"
    )


def gguf_refusal(path: str) -> InputError:
    """The error for a GGUF file (first four bytes b"GGUF"), which is not a safetensors checkpoint."""
    return InputError(f"{path}: is a GGUF file, which lorasurgeon does not read; {REMEDIES['gguf']}")


def qlora_warning(adapter_config: Mapping[str, Any], readme: str | None, where: str) -> str | None:
    """The `check` warning for an adapter trained against a quantized base (QLoRA), or None.

    PEFT's adapter_config.json records no quantization, only `base_model_name_or_path`. PEFT < 0.7 wrote the
    bitsandbytes config into the adapter's README.md (`QLORA_README`; the code is still in PEFT 0.21.2 but
    unreachable: it asks a dict for an attribute), and unsloth's 4-bit bases are named "…-bnb-4bit".
    """
    base = adapter_config.get("base_model_name_or_path")
    words = set(re.split(r"[-_/.]", str(base).lower())) & set(QUANTIZED_NAME_WORDS) if base else set()
    if readme is not None and QLORA_README in readme:
        evidence = "its README.md records the bitsandbytes config it was trained with"
    elif words:
        evidence = f"base_model_name_or_path {base!r} names a quantized model"
    else:
        return None
    return (
        f"{where}: trained against a quantized base ({evidence}); merged into the 16-bit base, the result also "
        "carries the difference between that base and its quantized form"
    )


def _method_of(qc: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> tuple[Method | None, str]:
    """(method, how we know it) from quantization_config, else from tensor names; (None, "") when unquantized."""
    if qc is not None:
        name = qc.get("quant_method")
        if name == "bitsandbytes" or qc.get("load_in_4bit") or qc.get("load_in_8bit"):
            eight = bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit"))
            evidence = f"quantization_config.load_in_{8 if eight else 4}bit"
            return ("bitsandbytes-8bit" if eight else "bitsandbytes-4bit"), evidence
        return CONFIG_METHODS.get(str(name), "unknown"), f"quantization_config.quant_method {name!r}"
    for suffix, method in NAME_SIGNS:
        for tensor in tensors:
            if tensor.endswith(suffix) and (suffix != "_blocks" or tensor[: -len(suffix)] + "_scales" in tensors):
                return method, f"tensor {tensor!r}"
    return None, ""


def _companions(tensors: Mapping[str, TensorInfo]) -> frozenset[str]:
    """Every tensor whose name marks it as part of a quantization (for methods we describe but do not merge)."""
    signs = (*(suffix for suffix, _ in NAME_SIGNS), "_scales", ".weight_zero_point", ".weight_shape")
    return frozenset(name for name in tensors if name.endswith(signs) or ".quant_state." in name)
