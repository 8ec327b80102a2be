"""transformers architecture tables: which modules are Conv1D, embeddings and heads, and the base-model prefixes a
checkpoint may store its names without (quantized checkpoints: formats/quantization.py).

Pure data and functions of strings; see shared FORMATS.md §1.5, §2.2, §4.1 and §2.11 for where each table comes from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

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

# Module names of input and output embeddings; a tied checkpoint stores only the first (FORMATS.md §4.1).
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in")
OUTPUT_EMBEDDING = "lm_head.weight"
# Module names that are nn.Embedding in transformers models (extract decomposes them only when asked).
EMBEDDINGS = frozenset(
    {"embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "shared", "position_embeddings", "embed_positions"}
)
# Output heads and classifiers: Linear, but left out by default, as PEFT's "all-linear" leaves them out.
HEADS = frozenset({"lm_head", "embed_out", "score", "classifier", "qa_outputs"})


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


def input_embedding(names: Iterable[str]) -> str | None:
    """The checkpoint name of the input embedding among `names` (`model.embed_tokens.weight`, ...), if any."""
    for name in names:
        module, _, param = name.rpartition(".")
        if param == "weight" and module.rpartition(".")[2] in INPUT_EMBEDDINGS:
            return name
    return None


def task_type(config: Mapping[str, Any]) -> str | None:
    """PEFT's task_type for a model config.json: CAUSAL_LM for causal language models, else None."""
    architectures = config.get("architectures") or []
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "CAUSAL_LM" if causal else None
