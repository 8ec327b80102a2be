"""The formats wing as tables: every format's keys map to one role and one module path, an unknown key is an error
that names it, and the transformers architecture tables agree with transformers' own classes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorasurgeon.errors import InputError, UnsupportedError
from lorasurgeon.formats import detect, kohya, load_adapter, peft
from lorasurgeon.formats.architectures import CONV1D_MODULES

SITE = Path(torch.__file__).parent.parent / "transformers" / "models"

# (format, key) -> (role, module path) as the format's reader splits it.
# fmt: off
KEYS = [
    ("peft", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "lora_A", "model.layers.0.self_attn.q_proj"),
    ("peft", "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "lora_B", "model.layers.0.self_attn.q_proj"),
    ("peft", "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "lora_B_bias", "model.layers.0.self_attn.q_proj"),
    ("peft", "base_model.model.model.embed_tokens.lora_embedding_A", "lora_embedding_A", "model.embed_tokens"),
    ("peft", "base_model.model.model.embed_tokens.lora_embedding_B", "lora_embedding_B", "model.embed_tokens"),
    ("peft", "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector", "lora_magnitude_vector", "model.layers.0.mlp.up_proj"),
    ("peft", "base_model.model.lm_head.lora_magnitude_vector.weight", "lora_magnitude_vector", "lm_head"),
    ("peft", "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", "trainable_tokens_delta", "model.embed_tokens"),
    ("peft", "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", "replacement", "model.layers.0.self_attn.q_proj"),
    ("peft", "base_model.model.lm_head.weight", "replacement", "lm_head"),
    ("peft", "model.layers.1.mlp.down_proj.lora_A.weight", "lora_A", "model.layers.1.mlp.down_proj"),  # bare export
    ("diffusers", "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "lora_A", "unet.down_blocks.0.attentions.0.proj_in"),
    ("diffusers", "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight", "lora_B", "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
    ("kohya", "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", "lora_down", "lora_unet_mid_block_attentions_0_proj_in"),
    ("kohya", "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "lora_up", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
    ("kohya", "lora_unet_conv_in.alpha", "alpha", "lora_unet_conv_in"),
    ("kohya", "lora_unet_conv_in.lora_mid.weight", "lora_mid.weight", "lora_unet_conv_in"),
    ("kohya", "lora_unet_conv_in.hada_w1_a", "hada_w1_a", "lora_unet_conv_in"),
    ("kohya", "lora_unet_conv_in.lokr_w2", "lokr_w2", "lora_unet_conv_in"),
    ("kohya", "lora_unet_conv_in.dora_scale", "dora_scale", "lora_unet_conv_in"),
    ("kohya", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.on_input", "on_input", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
]
# fmt: on


@pytest.mark.parametrize(("fmt", "key", "role", "module"), KEYS, ids=[f"{f}:{r}:{k[-30:]}" for f, k, r, _ in KEYS])
def test_each_key_has_one_role_and_module(fmt: str, key: str, role: str, module: str) -> None:
    if fmt == "kohya":
        assert kohya.split_key(key) == (module, role)
    else:
        split = peft.split_key(key)
        assert (split.role, split.module) == (role, module)


def write(path: Path, names: list[str]) -> Path:
    save_file({name: torch.ones(4, 4) for name in names}, path)
    return path


@pytest.mark.parametrize(
    ("names", "fmt"),
    [
        (["base_model.model.x.lora_A.weight", "base_model.model.x.lora_B.weight"], "peft"),
        (["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"], "kohya"),
        (["lora_unet_x.hada_w1_a", "lora_unet_x.hada_w1_b"], "kohya"),
        (["unet.x.lora_A.weight", "unet.x.lora_B.weight"], "diffusers"),
        (["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"], "checkpoint"),
    ],
)
def test_each_format_is_detected_from_its_keys(tmp_path: Path, names: list[str], fmt: str) -> None:
    assert detect(write(tmp_path / "a.safetensors", names)) == fmt


@pytest.mark.parametrize(
    ("names", "unknown", "error"),
    [
        (
            ["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "lora_unet_x.mystery"],
            "lora_unet_x.mystery",
            UnsupportedError,
        ),
        (["unet.x.lora_A.weight", "unet.x.lora_B.weight", "unet.x.weight"], "unet.x.weight", UnsupportedError),
        (["model.embed_tokens.weight", "lm_head.weight"], "not an adapter.*e.g. lm_head.weight", InputError),
    ],
)
def test_an_unknown_key_is_an_error_naming_it(tmp_path: Path, names: list[str], unknown: str, error: type) -> None:
    """kohya and diffusers files hold LoRA tensors only; a PEFT-keyed file with no LoRA factor is no adapter at all
    (it looks like a checkpoint: the error says so and names a tensor)."""
    with pytest.raises(error, match=unknown if "*" in unknown else re.escape(unknown)):
        load_adapter(write(tmp_path / "a.safetensors", names), alpha=8)


def test_conv1d_table_matches_transformers_own_modeling_files() -> None:
    """Every transformers model whose modeling code builds a Conv1D is in the table (so a new architecture, or one
    the table missed, fails here)."""
    building = {p.parent.name for p in SITE.glob("*/modeling_*.py") if re.search(r"= Conv1D\(", p.read_text())}
    types = {"openai": "openai-gpt"}  # the folder of the `openai-gpt` model type
    assert {types.get(name, name) for name in building} == set(CONV1D_MODULES)


def conv1d_leaves(model: torch.nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, Conv1D)}


@pytest.mark.oracle
@pytest.mark.parametrize("model_type", sorted(CONV1D_MODULES))
def test_conv1d_modules_are_transformers_own(model_type: str) -> None:
    """The table's module names are exactly those transformers builds as Conv1D for the model type (with cross
    attention where the type has it); names alone would mislead (GPT-Neo's c_fc is nn.Linear)."""
    import transformers

    small = {
        "gpt2": {"n_embd": 32, "n_layer": 1, "n_head": 4, "add_cross_attention": True},
        "openai-gpt": {"n_embd": 32, "n_layer": 1, "n_head": 4},
        "imagegpt": {"n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": 16, "add_cross_attention": True},
        "decision_transformer": {"hidden_size": 32, "n_layer": 1, "n_head": 4, "add_cross_attention": True},
        "clvp": {},
    }
    config = transformers.AutoConfig.for_model(model_type, **small[model_type])
    if model_type == "clvp":
        for sub in (config.text_config, config.speech_config, config.decoder_config):
            sub.hidden_size, sub.num_hidden_layers, sub.intermediate_size, sub.num_attention_heads = 32, 1, 64, 4
    model = transformers.AutoModel.from_config(config)
    assert conv1d_leaves(model) == CONV1D_MODULES[model_type]


@pytest.mark.oracle
def test_same_names_as_linear_are_not_in_the_table() -> None:
    import transformers

    config = transformers.AutoConfig.for_model(
        "gpt_neo", hidden_size=32, num_layers=1, num_heads=4, attention_types=[[["global"], 1]]
    )
    model = transformers.AutoModel.from_config(config)
    assert not conv1d_leaves(model) and "gpt_neo" not in CONV1D_MODULES
    assert {"c_fc", "c_proj"} <= {n.rpartition(".")[2] for n, _ in model.named_modules()}  # the names exist
