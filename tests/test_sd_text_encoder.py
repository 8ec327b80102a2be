"""Stable Diffusion text encoders in both layouts: transformers 5 holds and saves a CLIPTextModel without
`text_model.` (`encoder.layers.*`), SD1-era files keep it. kohya LoRAs named either way (`lora_te_text_model_*`, as
sd-scripts writes them, and `lora_te_encoder_layers_*`), and diffusers/PEFT files with either path, merge into
either layout exactly as diffusers applies them; convert writes the `text_model` names ComfyUI's key map knows.

The oracle is diffusers itself: its kohya conversion (`_convert_non_diffusers_lora_to_diffusers`) and text encoder
loader (`_load_lora_into_text_encoder`, which strips `text_model.` for a model without it) on a transformers-5
CLIPTextModel; its forward with the LoRA active must equal the forward of `from_pretrained(OUT)`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import read_tensors
from moe_models import randomized, save_layout
from safetensors.torch import save_file

import lorasurgeon

pytestmark = pytest.mark.oracle
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def text_encoder(directory: Path, layout: str) -> Path:
    """A tiny CLIPTextModel saved as transformers 5 writes it ("saved": encoder.layers.*) or as SD1-era files
    hold it ("legacy": text_model.encoder.layers.*)."""
    import transformers as tf

    config = tf.CLIPTextConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
        max_position_embeddings=16,
    )  # fmt: skip
    return save_layout(randomized(tf.CLIPTextModel(config)), directory, layout, "clip_text")  # type: ignore[arg-type]


def kohya_lora(path: Path, with_text_model: bool, seed: int = 3) -> Path:
    """A kohya LoRA on every projection of both layers, named with or without `text_model_`, alpha ≠ rank."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for projection in PROJECTIONS:
            out, inp = (48, 32) if projection == "mlp.fc1" else (32, 48) if projection == "mlp.fc2" else (32, 32)
            module = f"{'text_model_' if with_text_model else ''}encoder_layers_{layer}_{projection.replace('.', '_')}"
            tensors[f"lora_te_{module}.lora_down.weight"] = torch.randn(4, inp, generator=generator) * 0.3
            tensors[f"lora_te_{module}.lora_up.weight"] = torch.randn(out, 4, generator=generator) * 0.3
            tensors[f"lora_te_{module}.alpha"] = torch.tensor(2.0)
    save_file(tensors, path)
    return path


def diffusers_forward(base: Path, lora: dict[str, torch.Tensor]) -> torch.Tensor:
    """The text encoder's output with `lora` (kohya keys) applied by diffusers, onto transformers' own load of BASE."""
    import transformers as tf
    from diffusers.loaders.lora_base import _load_lora_into_text_encoder
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    model = tf.CLIPTextModel.from_pretrained(base, dtype=torch.float32).eval()
    state, alphas = _convert_non_diffusers_lora_to_diffusers(dict(lora))
    _load_lora_into_text_encoder(state, alphas, model, prefix="text_encoder", adapter_name="x")
    assert any("lora_A" in name for name, _ in model.named_parameters())  # guard: diffusers did apply it
    with torch.no_grad():
        return model(input_ids=TOKENS).last_hidden_state


def merged_forward(out: Path) -> torch.Tensor:
    import transformers as tf

    with torch.no_grad():
        return tf.CLIPTextModel.from_pretrained(out, dtype=torch.float32).eval()(input_ids=TOKENS).last_hidden_state


@pytest.mark.parametrize("layout", ["saved", "legacy"])
@pytest.mark.parametrize("with_text_model", [True, False], ids=["lora_te_text_model", "lora_te_encoder"])
def test_kohya_text_encoder_lora_on_both_layouts(layout: str, with_text_model: bool, tmp_path: Path) -> None:
    base = text_encoder(tmp_path / "te", layout)
    lora = kohya_lora(tmp_path / "lora.safetensors", with_text_model)
    summary = lorasurgeon.merge(base, [lora], tmp_path / "out")
    assert summary.changed == 2 * len(PROJECTIONS)
    assert read_tensors(tmp_path / "out").keys() == read_tensors(base).keys()  # the base's own layout is kept
    want = diffusers_forward(base, read_tensors(lora))
    got = merged_forward(tmp_path / "out")
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, merged_forward(base), atol=1e-3)  # guard: the LoRA moved the output


@pytest.mark.parametrize("layout", ["saved", "legacy"])
@pytest.mark.parametrize("path", ["text_encoder.text_model.encoder", "text_encoder.encoder"])
def test_diffusers_text_encoder_file_on_both_layouts(layout: str, path: str, tmp_path: Path) -> None:
    """A diffusers LoRA file (text_encoder.<module>.lora_A/B, network alphas given by --alpha) with either path."""
    base = text_encoder(tmp_path / "te", layout)
    kohya = read_tensors(kohya_lora(tmp_path / "kohya.safetensors", True))
    tensors = {}
    for key, value in kohya.items():
        module, _, role = key.partition(".")
        if role == "alpha":
            continue
        dotted = module.removeprefix("lora_te_text_model_encoder_layers_").replace("_", ".", 1)
        dotted = dotted.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
        name = f"{path}.layers.{dotted}.{'lora_A' if role == 'lora_down.weight' else 'lora_B'}.weight"
        tensors[name] = value
    save_file(tensors, tmp_path / "diffusers.safetensors")
    lorasurgeon.merge(base, [tmp_path / "diffusers.safetensors"], tmp_path / "out", alpha=2.0)
    assert torch.allclose(merged_forward(tmp_path / "out"), diffusers_forward(base, kohya), atol=1e-5, rtol=1e-5)


def test_convert_writes_the_text_model_names_comfyui_knows(tmp_path: Path) -> None:
    """A PEFT adapter trained on a transformers-5 CLIPTextModel (module paths encoder.layers.*) converts to kohya
    `lora_te_text_model_*` and diffusers `text_encoder.text_model.*` names, which diffusers still applies exactly."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = text_encoder(tmp_path / "te", "saved")
    model = tf.CLIPTextModel.from_pretrained(base, dtype=torch.float32)
    # out_proj too: diffusers (0.42) takes a text-encoder state dict for its old attention format only when some
    # key holds to_out_lora, so a kohya LoRA on q_proj without out_proj would lose q_proj there.
    targets = ["q_proj", "out_proj", "fc2"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = peft_model.eval()(input_ids=TOKENS).last_hidden_state
    lorasurgeon.convert(tmp_path / "peft", tmp_path / "kohya.safetensors", to="kohya", component="text_encoder")
    kohya = read_tensors(tmp_path / "kohya.safetensors")
    assert {k.partition(".")[0] for k in kohya} == {
        f"lora_te_text_model_encoder_layers_{i}_{m}"
        for i in range(2)
        for m in ("self_attn_q_proj", "self_attn_out_proj", "mlp_fc2")
    }
    assert torch.allclose(diffusers_forward(base, kohya), want, atol=1e-5, rtol=1e-5)
    lorasurgeon.convert(tmp_path / "peft", tmp_path / "diffusers.safetensors", to="diffusers", component="text_encoder")
    names = {k.rpartition(".lora_")[0] for k in read_tensors(tmp_path / "diffusers.safetensors")}
    modules = ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc2")
    assert names == {f"text_encoder.text_model.encoder.layers.{i}.{m}" for i in range(2) for m in modules}
    lorasurgeon.merge(base, [tmp_path / "kohya.safetensors"], tmp_path / "out")  # and back onto the flat file
    assert torch.allclose(merged_forward(tmp_path / "out"), want, atol=1e-5, rtol=1e-5)
