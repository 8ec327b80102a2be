"""kohya / sd-scripts (FORMATS.md §5.1-§5.3) and diffusers (§5.6) LoRA files merged into tiny SD-shaped state
dicts.

kohya keys are written with sd-scripts' forward naming rule (prefix + module path with "." -> "_"), diffusers
keys as `<component>.<module path>.lora_A/lora_B.weight`. The expected tensors are the formula of §5.3
computed here in fp64: W + (alpha / r) · up @ down, reshaped for convs, alpha = r when the `.alpha` key is
missing (diffusers: alpha from the metadata, else `.alpha`, else r). Tolerance: fp32 within 1e-6 of the
tensor's max magnitude.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from builders import read_tensors, refused
from safetensors.torch import save_file

import lorasurgeon

# SD1-style U-Net in diffusers naming (a `unet/` component file): Linear, 1x1 conv proj_in, 3x3 resnet conv.
UNET = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (32, 32),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": (32, 32),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias": (32,),
    "down_blocks.0.attentions.0.proj_in.weight": (32, 16, 1, 1),
    "down_blocks.0.resnets.0.conv1.weight": (16, 8, 3, 3),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (64, 32),
    "mid_block.attentions.0.norm.weight": (32,),
}
# SDXL single file (SAI names): U-Net, text encoder 1 (HF CLIP), text encoder 2 (OpenCLIP, fused q/k/v).
SDXL = {
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (32, 16),
    "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (24, 24),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (48, 24),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (96, 32),
}


def save_base(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def kohya_name(prefix: str, tensor: str, strip: str = "") -> str:
    """sd-scripts' rule: component prefix + the module path with every "." replaced by "_"."""
    return f"{prefix}_{tensor.removeprefix(strip).removesuffix('.weight').replace('.', '_')}"


def save_lora(path: Path, modules: dict[str, tuple[tuple[int, ...], float | None]], rank: int = 4) -> dict:
    """kohya file: module name -> (base weight shape, alpha or None for no `.alpha` key); returns the factors."""
    torch.manual_seed(1)
    tensors, factors = {}, {}
    for name, (shape, alpha) in modules.items():
        down = torch.randn(rank, shape[1], *shape[2:]) * 0.3
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2))) * 0.3
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        factors[name] = (down, up, alpha if alpha is not None else rank)
    save_file(tensors, path, metadata={"ss_network_dim": str(rank)})
    return factors


def expected(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    r = down.shape[0]
    delta = up.double().reshape(up.shape[0], r) @ down.double().reshape(r, -1)
    return weight.double() + (alpha / r) * delta.reshape(weight.shape)


def assert_merged(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor], targets: dict) -> None:
    for name, tensor in out.items():
        want = expected(base[name], *targets[name]) if name in targets else base[name].double()
        tolerance = 1e-6 * want.abs().max().item()
        assert (tensor.double() - want).abs().max().item() <= tolerance, name
        assert torch.equal(tensor, base[name]) == (name not in targets), name  # changed exactly the targets


def test_kohya_on_a_diffusers_unet_component(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    base = save_base(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", UNET)
    weights = [n for n in UNET if n.endswith(".weight") and "norm" not in n]
    modules = {kohya_name("lora_unet", n): (UNET[n], 8.0 if i % 2 else None) for i, n in enumerate(weights)}
    modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] = ((24, 24), 4.0)  # not in a U-Net file
    factors = save_lora(tmp_path / "lora.safetensors", modules)
    summary = lorasurgeon.merge(tmp_path / "unet", [tmp_path / "lora.safetensors"], tmp_path / "out")
    targets = {n: factors[kohya_name("lora_unet", n)] for n in weights}
    assert_merged(read_tensors(tmp_path / "out"), base, targets)
    (skipped,) = summary.plan.warnings
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in skipped.message
    assert {t.module.kind for s in summary.plan.steps for t in s.terms} == {"linear", "conv"}


def test_kohya_on_an_sdxl_single_file(tmp_path: Path) -> None:
    base = save_base(tmp_path / "sdxl.safetensors", SDXL)
    unet = [n for n in SDXL if n.startswith("model.")]
    te1 = [n for n in SDXL if n.startswith("conditioner.embedders.0.")]
    names = {n: kohya_name("lora_unet", n, "model.diffusion_model.") for n in unet}
    names |= {n: kohya_name("lora_te1", n, "conditioner.embedders.0.transformer.") for n in te1}
    factors = save_lora(tmp_path / "lora.safetensors", {k: (SDXL[n], 2.0) for n, k in names.items()}, rank=2)
    lorasurgeon.merge(tmp_path / "sdxl.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    assert_merged(read_tensors(tmp_path / "out.safetensors"), base, {n: factors[k] for n, k in names.items()})


def test_refuses_kohya_names_no_layout_has(tmp_path: Path) -> None:
    save_base(tmp_path / "sdxl.safetensors", SDXL)
    # OneTrainer adapts text encoder 2's text projection; sd-scripts never does, and it has no mapped name here.
    projection = "lora_te2_text_projection"
    save_lora(tmp_path / "te2.safetensors", {projection: ((32, 32), 4.0)})
    message = refused(tmp_path / "sdxl.safetensors", tmp_path / "te2.safetensors", tmp_path / "o", "no base tensor")
    assert f"{projection}.lora_down.weight" in message and "Hugging Face CLIP names" in message
    # An SD1 LoRA for a block the LDM single file does not have: refused, not guessed.
    ldm = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32)}
    save_base(tmp_path / "sd1.safetensors", ldm)
    missing = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"
    save_lora(tmp_path / "sd1-lora.safetensors", {missing: ((32, 32), 4.0)})
    message = refused(tmp_path / "sd1.safetensors", tmp_path / "sd1-lora.safetensors", tmp_path / "o", "SAI names")
    assert f"{missing}.lora_down.weight" in message


@pytest.mark.parametrize(
    ("key", "what"),
    [("hada_w1_a", "different algorithms"), ("lokr_w1", "different algorithms")],
)
def test_refuses_lycoris_factors_in_a_lora_module_by_name(tmp_path: Path, key: str, what: str) -> None:
    (tmp_path / "unet").mkdir()
    save_base(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", UNET)
    name = kohya_name("lora_unet", next(iter(UNET)))
    save_lora(tmp_path / "lora.safetensors", {name: ((32, 32), 4.0)})
    tensors = read_tensors(tmp_path / "lora.safetensors")
    tensors[f"{name}.{key}"] = torch.ones(32, 1)
    save_file(tensors, tmp_path / "lora.safetensors")
    message = refused(tmp_path / "unet", tmp_path / "lora.safetensors", tmp_path / "o", what)
    assert f"{name}.{key}" in message


def save_diffusers_lora(
    path: Path, modules: dict[str, tuple[int, ...]], alphas: dict[str, float], metadata: dict | None, rank: int = 4
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers file: `unet.<path>.lora_A/lora_B.weight`, optional `.alpha` tensors and lora_adapter_metadata."""
    torch.manual_seed(2)
    tensors, factors = {}, {}
    for name, shape in modules.items():
        a = torch.randn(rank, shape[1], *shape[2:]) * 0.3
        b = torch.randn(shape[0], rank, *([1] * (len(shape) - 2))) * 0.3
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
        if name in alphas:
            tensors[f"{name}.alpha"] = torch.tensor(alphas[name])
        factors[name] = (a, b)
    extra = {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True)} if metadata else {}
    save_file(tensors, path, metadata={"format": "pt", **extra})
    return factors


@pytest.mark.parametrize("scale", ["default", "alphas", "metadata"])
def test_diffusers_lora_on_a_unet_component(tmp_path: Path, scale: str) -> None:
    (tmp_path / "unet").mkdir()
    base = save_base(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", UNET)
    weights = [n for n in UNET if n.endswith(".weight") and "norm" not in n]
    modules = {f"unet.{n.removesuffix('.weight')}": UNET[n] for n in weights}
    modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] = (24, 24)  # another component
    alphas = {name: 2.0 + i for i, name in enumerate(modules)} if scale == "alphas" else {}
    metadata = {"unet.r": 4, "unet.lora_alpha": 6, "unet.use_rslora": True} if scale == "metadata" else None
    factors = save_diffusers_lora(tmp_path / "lora.safetensors", modules, alphas, metadata)
    summary = lorasurgeon.merge(tmp_path / "unet", [tmp_path / "lora.safetensors"], tmp_path / "out")
    # expected() scales by alpha / r with r = 4, so rsLoRA's 6 / sqrt(4) = 3 is alpha 12 there.
    alpha = {"default": lambda m: 4.0, "alphas": alphas.__getitem__, "metadata": lambda m: 12.0}[scale]
    paths = {n: f"unet.{n.removesuffix('.weight')}" for n in weights}
    assert_merged(read_tensors(tmp_path / "out"), base, {n: (*factors[m], alpha(m)) for n, m in paths.items()})
    (skipped,) = summary.plan.warnings
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in skipped.message
    # report gives the scales the merge used (it once called every diffusers file's scale unknown)
    described = {m.module: m.scale for m in lorasurgeon.report(tmp_path / "lora.safetensors").modules}
    assert all(described[m] == pytest.approx(alpha(m) / 4) for m in paths.values())


def test_transformer_keys_without_metadata_need_alpha(tmp_path: Path) -> None:
    """`transformer.` keys without diffusers metadata could be a bare PEFT export of a GPT-2: never guessed."""
    (tmp_path / "base").mkdir()
    save_base(tmp_path / "base" / "model.safetensors", {"transformer_blocks.0.attn.to_q.weight": (32, 32)})
    save_diffusers_lora(
        tmp_path / "lora.safetensors", {"transformer.transformer_blocks.0.attn.to_q": (32, 32)}, {}, None
    )
    refused(tmp_path / "base", tmp_path / "lora.safetensors", tmp_path / "o", "the LoRA scale is unknown; pass alpha=…")


def test_report_counts_the_base_parameters_a_kohya_lora_changes(tmp_path: Path) -> None:
    """report --base resolves kohya names as the merge does (it used to count PEFT names only: 0 for kohya)."""
    save_base(tmp_path / "unet.safetensors", UNET)
    chosen = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.resnets.0.conv1.weight",
    ]
    save_lora(tmp_path / "lora.safetensors", {kohya_name("lora_unet", n): (UNET[n], 4.0) for n in chosen})
    check = lorasurgeon.report(tmp_path / "lora.safetensors", base=tmp_path / "unet.safetensors").check
    assert check is not None and not check.findings
    assert check.touched_parameters == sum(math.prod(UNET[n]) for n in chosen) > 0
    assert check.base_parameters == sum(math.prod(shape) for shape in UNET.values())
