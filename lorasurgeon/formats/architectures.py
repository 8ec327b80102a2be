"""transformers architecture tables: which modules are Conv1D, embeddings and heads, and the base-model prefixes a
checkpoint may store its names without (quantized checkpoints: formats/quantization.py).

Pure data and functions of strings; see shared FORMATS.md §1.5, §2.2, §4.1 and §2.11 for where each table comes from.
"""

from __future__ import annotations

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
