"""transformers architecture tables: which modules are Conv1D, embeddings and heads, the base-model prefixes a
checkpoint may store its names without, and the companion tensors quantizers write.

Pure data and functions of strings; see shared FORMATS.md §1.5, §2.2, §4.1 and §2.11 for where each table comes from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorasurgeon.errors import Finding
from lorasurgeon.header import TensorInfo

# transformers model types whose projections are `Conv1D` (weights stored (in, out)), and which modules are.
# Names alone do not decide it: GPT-Neo's c_fc/c_proj and GPT-BigCode's c_attn are nn.Linear.
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "decision_transformer": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "clvp": frozenset({"c_fc", "c_proj"}),  # the decoder's MLP; its attention projections are nn.Linear
}

# First path components a checkpoint may store without: transformers' base-model prefixes, and the pipeline
# components of diffusers LoRA files (`unet.down_blocks...` for the tensors of `unet/`).
MODEL_PREFIXES = frozenset(
    {
        "transformer",
        "model",
        "base_model",
        "gpt_neox",
        "bert",
        "roberta",
        "unet",
        "text_encoder",
        "text_encoder_2",
        "prior",
    }
)

# Module names of input embeddings, to which an output head may be tied (FORMATS.md §4.1; which head, and under
# which name, is the architecture's: formats.model_classes).
INPUT_EMBEDDINGS = frozenset(
    {"embed_tokens", "wte", "word_embeddings", "embed_in", "shared", "tok_embeddings", "token_embedding"}
)
# Module names that are nn.Embedding in transformers models (extract decomposes them only when asked, and as PEFT's
# Embedding LoRA: a Linear LoRA's keys would not load onto them). CLIP and SigLIP name theirs token_embedding and
# position_embedding, BERT has token_type_embeddings, T5 relative_attention_bias, ModernBERT tok_embeddings.
EMBEDDINGS = INPUT_EMBEDDINGS | {
    "wpe",
    "position_embeddings",
    "position_embedding",
    "embed_positions",
    "token_type_embeddings",
    "relative_attention_bias",
    "word_embedding",
    "entity_embeddings",
}
# Output heads and classifiers: Linear, but left out by default, as PEFT's "all-linear" leaves them out.
HEADS = frozenset({"lm_head", "embed_out", "score", "classifier", "qa_outputs"})

# Name components of the companion tensors that quantizers write beside a weight (bitsandbytes, GPTQ/AWQ, FP8).
QUANTIZED_PARTS = frozenset(
    {
        "absmax",
        "quant_map",
        "quant_state",
        "nested_absmax",
        "SCB",
        "qweight",
        "qzeros",
        "g_idx",
        "weight_scale",
        "weight_scale_inv",
        "input_scale",
    }
)


def tensor_candidates(module: str, param: str) -> list[str]:
    """Checkpoint names that may hold `module`'s `param`, most specific first.

    transformers loads checkpoints with or without the model's base prefix (original GPT-2 files store
    `h.0.attn.c_attn.weight` for the module `transformer.h.0.attn.c_attn`), so both forms are tried.
    """
    name = f"{module}.{param}"
    first, _, rest = name.partition(".")
    candidates = [name]
    if rest and first in MODEL_PREFIXES:
        candidates.append(rest)
    return candidates


def is_conv1d(model_type: str | None, module: str) -> bool:
    """True when `module` of a `model_type` model is a transformers Conv1D (stored (in, out))."""
    return module.rpartition(".")[2] in CONV1D_MODULES.get(model_type or "", frozenset())


def quantized_part(name: str) -> str | None:
    """The quantizer companion component in a tensor name (`...q_proj.weight.absmax` -> `absmax`), if any."""
    return next((part for part in name.split(".") if part in QUANTIZED_PARTS), None)


def quantized_findings(
    config: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo], root: Path
) -> list[Finding]:
    """A quantized base cannot take an exact merge (FORMATS.md §2.11): refused, naming what shows it."""
    method = (config or {}).get("quantization_config")
    if method is not None:
        kind = method.get("quant_method", "unknown") if isinstance(method, dict) else "unknown"
        message = (
            f"{root / 'config.json'}: the base is quantized (quantization_config, {kind}); merging "
            "into quantized weights is not exact: merge into the original unquantized checkpoint"
        )
        return [Finding.of("error", message)]
    for info in tensors.values():
        part = quantized_part(info.name)
        if part:
            message = (
                f"{info.path.name}: {info.name} is a quantizer's {part!r} tensor, so the base is quantized; "
                "merging into quantized weights is not exact: merge into the original unquantized checkpoint"
            )
            return [Finding.of("error", message, base_key=info.name)]
    return []
