"""Tiny seeded models of the architectures people fine-tune with LoRA, built with transformers (never downloaded):
their configs, classes, the module names of their input embedding and output head, and the inputs of a forward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
DECODER = dict(SMALL, num_key_value_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=True)
ENCODER_DECODER = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
WHISPER = dict(
    vocab_size=64,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_mel_bins=8,
    max_source_positions=16,
    max_target_positions=16,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=0,
)


def text(model: Any) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(12).reshape(2, 6) % 64}


def seq2seq(model: Any) -> dict[str, torch.Tensor]:
    return {**text(model), "decoder_input_ids": torch.arange(8).reshape(2, 4)}


def speech(model: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 32, generator=generator)
    return {"input_features": features, "decoder_input_ids": torch.arange(8).reshape(2, 4)}


@dataclass(frozen=True)
class Arch:
    """An architecture: its config, class, the module names of its input embedding and head, the head's checkpoint
    tensor, the model inputs of a forward pass and the output compared."""

    config: str
    model: str
    embedding: str
    head: str
    head_tensor: str
    inputs: Callable[[Any], dict[str, torch.Tensor]] = text
    fields: dict[str, Any] = field(default_factory=dict)
    output: str = "logits"


ARCHS = {
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", "embed_tokens", "lm_head", "lm_head.weight", fields=DECODER),
    "gemma": Arch("GemmaConfig", "GemmaForCausalLM", "embed_tokens", "lm_head", "lm_head.weight", fields=DECODER),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", "embed_tokens", "lm_head", "lm_head.weight", fields=DECODER),
    "falcon": Arch(
        "FalconConfig",
        "FalconForCausalLM",
        "word_embeddings",
        "lm_head",
        "lm_head.weight",
        fields=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
    ),
    "gpt2": Arch(
        "GPT2Config",
        "GPT2LMHeadModel",
        "wte",
        "lm_head",
        "lm_head.weight",
        fields=dict(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32),
    ),
    "t5": Arch(
        "T5Config", "T5ForConditionalGeneration", "embed_tokens", "lm_head", "lm_head.weight", seq2seq, ENCODER_DECODER
    ),
    "bert-mlm": Arch(
        "BertConfig",
        "BertForMaskedLM",
        "word_embeddings",
        "decoder",
        "cls.predictions.decoder.weight",
        fields=dict(SMALL, max_position_embeddings=32),
    ),
    "whisper": Arch(
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        "embed_tokens",
        "proj_out",
        "proj_out.weight",
        speech,
        WHISPER,
    ),
}


def image_text(model: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {**text(model), "pixel_values": torch.randn(2, 3, 8, 8, generator=generator)}


CLIP = Arch(
    "CLIPConfig",
    "CLIPModel",
    "token_embedding",
    "text_projection",
    "text_projection.weight",
    image_text,
    dict(
        text_config=dict(SMALL, max_position_embeddings=16, projection_dim=8),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
            projection_dim=8,
        ),
        projection_dim=8,
    ),
    "logits_per_image",
)  # ties nothing: for extract, whose embeddings are named token_embedding and position_embedding


def load(arch: Arch, path: Path, **kwargs: Any) -> Any:
    import transformers

    loaded = getattr(transformers, arch.model).from_pretrained(path, dtype=torch.float32, **kwargs)
    return (loaded[0].eval(), loaded[1]) if isinstance(loaded, tuple) else loaded.eval()


def save_base(arch: Arch, path: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, arch.config)(**arch.fields)
    getattr(transformers, arch.model)(config).save_pretrained(path)
    return path


def forward(model: Any, arch: Arch) -> torch.Tensor:
    with torch.no_grad():
        return getattr(model(**arch.inputs(model)), arch.output)
