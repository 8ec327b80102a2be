"""Tiny seeded transformers-5 models for the naming and MoE tests, and the three layouts a checkpoint of one can be in.

Every parameter is random (so a wrong name mapping cannot pass a value check by two norms both being ones);
hidden 32 and intermediate sizes 24/48, so an (out, in) mix-up changes shapes. Four experts, two layers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import transformers as tf
from builders import read_tensors
from safetensors.torch import load_file, save_file

Layout = Literal["saved", "legacy", "memory"]
TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
}
VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 8,
}
CLIP_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "vocab_size": 64,
    "max_position_embeddings": 16,
}
SEQ2SEQ: dict[str, Any] = {
    "vocab_size": 64,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
}
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_config(model_type: str) -> Any:
    """A tiny MoE config: four experts, expert intermediate size ≠ hidden size."""
    experts = {"num_experts_per_tok": 2}
    if model_type == "mixtral":
        return tf.MixtralConfig(**TEXT, **experts, num_local_experts=4)
    if model_type == "qwen2_moe":
        moe = {"moe_intermediate_size": 24, "shared_expert_intermediate_size": 40, "decoder_sparse_step": 1}
        return tf.Qwen2MoeConfig(**TEXT, **experts, num_experts=4, **moe)
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(**TEXT, **experts, num_experts=4, moe_intermediate_size=24, head_dim=8)
    if model_type == "olmoe":
        return tf.OlmoeConfig(**TEXT, **experts, num_experts=4)
    if model_type == "gpt_oss":
        layers = ["sliding_attention", "full_attention"]
        return tf.GptOssConfig(**TEXT, **experts, num_local_experts=4, head_dim=8, layer_types=layers)
    if model_type == "deepseek_v3":  # layer 0 dense (first_k_dense_replace), layer 1 MoE with a shared expert
        mla = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8}
        routing = {"n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
        return tf.DeepseekV3Config(
            **TEXT, **experts, **mla, **routing, n_routed_experts=4, moe_intermediate_size=24, rope_parameters=ROPE
        )
    raise KeyError(model_type)


def _llava() -> Any:
    vision = tf.CLIPVisionConfig(**VISION)
    config = tf.LlavaConfig(text_config=tf.LlamaConfig(**TEXT), vision_config=vision, image_token_index=3)
    return tf.LlavaForConditionalGeneration(config)


def _gemma3() -> Any:
    tokens = {"image_token_index": 3, "boi_token_index": 4, "eoi_token_index": 5}
    text, vision = tf.Gemma3TextConfig(**TEXT, head_dim=8), tf.SiglipVisionConfig(**VISION)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, **tokens)
    return tf.Gemma3ForConditionalGeneration(config)


def _qwen2_vl() -> Any:
    text = {**TEXT, "rope_parameters": {**ROPE, "mrope_section": [1, 1, 2]}}
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "patch_size": 2}
    vision |= {"spatial_merge_size": 1, "temporal_patch_size": 1}
    return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vision))


def _whisper() -> Any:
    tokens = {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3, "decoder_start_token_id": 2}
    audio = {"num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 32}
    config = tf.WhisperConfig(**SEQ2SEQ, **tokens, **audio, suppress_tokens=[], begin_suppress_tokens=[])
    return tf.WhisperForConditionalGeneration(config)


# A tiny model of each naming family (the classes transformers' conversion tables are keyed by).
NAMED_MODELS: dict[str, Callable[[], Any]] = {
    "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(**VISION, num_labels=3)),
    "llava": _llava,
    "gemma3": _gemma3,
    "qwen2_vl": _qwen2_vl,
    "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**SEQ2SEQ, max_position_embeddings=64)),
    "whisper": _whisper,
    "siglip_vision": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)),
    "clip_vision": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)),
    "clip_text": lambda: tf.CLIPTextModel(tf.CLIPTextConfig(**CLIP_TEXT)),
    "clip_text_projection": lambda: tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**CLIP_TEXT, projection_dim=16)),
}


def named_model(family: str) -> Any:
    return NAMED_MODELS[family]()


def randomized(model: Any, seed: int = 0) -> Any:
    """`model` in eval mode with every parameter drawn from N(0, 1) (tied parameters stay tied)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


# The Hub's legacy files, written out here independently of the tables under test: llava-hf and Gemma 3 keep the
# CLIP/SigLIP tower's `vision_model.`, SD text encoders `text_model.`, SigLIP/CLIP vision models `vision_model.`.
LEGACY_PREFIXES = {
    "llava": ("vision_tower.", "vision_tower.vision_model."),
    "gemma3": ("vision_tower.", "vision_tower.vision_model."),
    "clip_text": ("", "text_model."),
    "clip_vision": ("", "vision_model."),
    "siglip_vision": ("", "vision_model."),
}


def save_layout(model: Any, directory: Path, layout: Layout, family: str = "") -> Path:
    """`model` saved as a checkpoint directory in one layout: "saved" is what save_pretrained writes for a model
    built from its config; "legacy" is that with the prefix older files on the Hub have (LEGACY_PREFIXES);
    "memory" is the in-memory state dict itself (experts fused, v5 names)."""
    model.save_pretrained(directory)
    if layout == "saved":
        return directory
    if layout == "memory":
        tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    else:
        old, new = LEGACY_PREFIXES[family]
        saved = load_file(directory / "model.safetensors")
        tensors = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in saved.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


# ------------------------------------------------------------------ PEFT adapters and merges on MoE models


def peft_merged(base_dir: Path, adapter_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().save_pretrained(out)
    return read_tensors(out)


def save_moe_adapter(base_dir: Path, out: Path, magnitude: float = 0.1, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model

    model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:  # B != 0 everywhere: every targeted expert gets a delta
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * magnitude)
    peft_model.save_pretrained(out)
    return out


ROUTER = {"gpt_oss": "mlp.router.weight"}
CASES: list[tuple[str, dict[str, Any]]] = [
    ("mixtral", {"target_modules": ["q_proj", "v_proj"], "target_parameters": [*EXPERTS, "mlp.gate.weight"]}),
    ("mixtral", {"target_modules": "all-linear"}),  # PEFT turns this into target_parameters itself
    ("qwen3_moe", {"target_modules": "all-linear"}),
    (
        "qwen2_moe",
        {
            "target_modules": ["o_proj", "shared_expert.gate_proj", "shared_expert.down_proj", "shared_expert_gate"],
            "target_parameters": [*EXPERTS, "mlp.gate.weight"],
            "rank_pattern": {"layers.1.mlp.experts.down_proj": 3},
            "alpha_pattern": {"gate_up_proj": 5},
        },
    ),
    (  # DeepSeek's shared experts need target_parameters: PEFT maps target_modules "…down_proj" to the experts
        "deepseek_v3",
        {
            "target_modules": ["q_a_proj", "kv_b_proj"],
            "target_parameters": [*EXPERTS, "mlp.gate.weight", "shared_experts.up_proj.weight"],
        },
    ),
    ("gpt_oss", {"target_modules": ["q_proj", "o_proj"], "target_parameters": [*EXPERTS, "mlp.router.weight"]}),
    ("olmoe", {"target_modules": ["k_proj"], "target_parameters": ["mlp.experts.gate_up_proj"], "use_rslora": True}),
]
