"""kohya LoRAs on every Stable Diffusion checkpoint layout (FORMATS.md §5.2, §5.3): SD1/SD2 single files in LDM
layout, SDXL kohya (SAI) names on a diffusers U-Net, OpenCLIP text encoders with fused q/k/v.

The oracles are not lorasurgeon's code:
* names: diffusers' converters. Tiny U-Nets take their diffusers names from a real `UNet2DConditionModel`; their
  LDM names are written here from the LDM `UNetModel`'s construction and checked by diffusers'
  `convert_ldm_unet_checkpoint` mapping them onto exactly the real model's names. Which diffusers module an SDXL
  kohya name lands on is asked of diffusers' own LoRA loading path, and OpenCLIP checkpoints are read back in
  Hugging Face names with diffusers' `convert_open_clip_checkpoint`.
* values: W + (alpha / r) · up @ down computed here in fp64 (alpha = r when `.alpha` is missing), q/k/v deltas added
  to their thirds of `in_proj_weight`; fp32 results within 1e-6 of the tensor's largest magnitude, with guards that
  exactly the targeted tensors (and rows) changed.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import metadata_of, read_tensors, refused
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lorasurgeon
from lorasurgeon.formats.kohya_names import kohya_names

pytestmark = pytest.mark.oracle

LDM = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT2 = "conditioner.embedders.1.model."
QKV = ("q", "k", "v")

# Tiny U-Nets: (diffusers config, attention per level, transformer depth per level). sd1 has SD1's four levels
# (input blocks up to 11, conv proj_in, an up block without attention before its upsampler); sd2 the same with
# Linear proj_in; sdxl SDXL's three levels, deeper transformers and label_emb; one-layer blocks test the arithmetic.
UNETS: dict[str, tuple[dict[str, Any], tuple[bool, ...], tuple[int, ...]]] = {
    "sd1": (
        {
            "layers_per_block": 2,
            "block_out_channels": (8, 8, 16, 16),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        },
        (True, True, True, False),
        (1, 1, 1, 1),
    ),
    "sdxl": (
        {
            "layers_per_block": 2,
            "block_out_channels": (8, 16, 16),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 3),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 8 + 6 * 4,
        },
        (False, True, True),
        (1, 2, 3),
    ),
    "one-layer": (
        {
            "layers_per_block": 1,
            "block_out_channels": (8, 16),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        },
        (True, False),
        (1, 1),
    ),
}
UNETS["sd2"] = ({**UNETS["sd1"][0], "use_linear_projection": True}, *UNETS["sd1"][1:])
TINY = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 8, "attention_head_dim": 4}


def pairs(*modules: str) -> list[str]:
    return [f"{m}.{p}" for m in modules for p in ("weight", "bias")]


ATTENTION = [f"{a}.to_{p}.weight" for a in ("attn1", "attn2") for p in QKV]
ATTENTION += pairs("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")


def resblock(prefix: str, skip: bool) -> list[str]:
    parts = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
    return pairs(*(f"{prefix}.{p}" for p in [*parts, *(["skip_connection"] if skip else [])]))


def spatial(prefix: str, depth: int) -> list[str]:
    names = pairs(*(f"{prefix}.{p}" for p in ("norm", "proj_in", "proj_out")))
    return names + [f"{prefix}.transformer_blocks.{t}.{a}" for t in range(depth) for a in ATTENTION]


def ldm_unet_names(
    channels: tuple[int, ...], layers: int, attention: tuple[bool, ...], depth: tuple[int, ...]
) -> list[str]:
    """The tensor names of LDM's `UNetModel` (openaimodel.py) with these settings, under model.diffusion_model.:
    per level `layers` ResBlocks (+ SpatialTransformer) and a Downsample, the middle block, then per level in reverse
    `layers + 1` ResBlocks (+ SpatialTransformer) and an Upsample after the last one."""
    names = pairs("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.0", "out.2")
    index, width = 1, channels[0]
    for level, out in enumerate(channels):
        for _ in range(layers):
            names += resblock(f"input_blocks.{index}.0", width != out)
            names += spatial(f"input_blocks.{index}.1", depth[level]) if attention[level] else []
            index, width = index + 1, out
        if level < len(channels) - 1:
            names += pairs(f"input_blocks.{index}.0.op")
            index += 1
    names += (
        resblock("middle_block.0", False) + spatial("middle_block.1", depth[-1]) + resblock("middle_block.2", False)
    )
    index = 0
    for level in reversed(range(len(channels))):
        for at in range(layers + 1):
            names += resblock(f"output_blocks.{index}.0", True)
            names += spatial(f"output_blocks.{index}.1", depth[level]) if attention[level] else []
            if level and at == layers:
                names += pairs(f"output_blocks.{index}.{2 if attention[level] else 1}.conv")
            index += 1
    return names


@dataclass(frozen=True)
class Unet:
    shapes: dict[str, tuple[int, ...]]  # diffusers name -> shape, from the real model
    ldm: dict[str, str]  # LDM name -> diffusers name, as diffusers converts it

    def weights(self) -> dict[str, str]:
        """LDM -> diffusers name of every weight a LoRA can adapt (Linear and Conv, not norms)."""
        return {x: d for x, d in self.ldm.items() if x.endswith(".weight") and len(self.shapes[d]) > 1}


@functools.cache
def unet(kind: str) -> Unet:
    config, attention, depth = UNETS[kind]
    model = UNet2DConditionModel(**TINY, norm_num_groups=4, **config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    names = ldm_unet_names(config["block_out_channels"], config["layers_per_block"], attention, depth)
    names += pairs("label_emb.0.0", "label_emb.0.2") if "addition_embed_type" in config else []
    tagged = {LDM + name: torch.tensor(float(i)) for i, name in enumerate(names)}
    settings = {k: config[k] for k in ("layers_per_block", "addition_embed_type") if k in config}
    converted = convert_ldm_unet_checkpoint(tagged, settings)
    ldm = {names[int(value.item())]: name for name, value in converted.items()}
    assert set(converted) == set(shapes) and len(ldm) == len(names)  # the LDM names above are the real ones
    return Unet(shapes, ldm)


def kohya(component: str, path: str) -> str:
    """sd-scripts' rule: component prefix + the module path with every "." replaced by "_"."""
    return f"{component}_{path.removesuffix('.weight').replace('.', '_')}"


@pytest.mark.parametrize("kind", list(UNETS))
def test_kohya_names_of_ldm_and_diffusers_unets_follow_diffusers(kind: str) -> None:
    u = unet(kind)
    from_ldm = kohya_names([LDM + x for x in u.ldm])
    from_diffusers = kohya_names(list(u.shapes))
    for x, d in u.weights().items():
        assert from_ldm[kohya("lora_unet", d)] == [LDM + x], x  # SD1/2: sd-scripts trains a diffusers U-Net
        assert from_ldm[kohya("lora_unet", x)] == [LDM + x], x  # SDXL: its own U-Net has the SAI names
        assert from_diffusers[kohya("lora_unet", x)] == [d], d  # SDXL names on a diffusers U-Net
        assert from_diffusers[kohya("lora_unet", d)] == [d], d


def openclip_text(prefix: str, width: int = 16, layers: int = 2) -> dict[str, tuple[int, ...]]:
    """A tiny OpenCLIP text transformer under `prefix`, as SD2 and SDXL single files store it."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (40, width),
        "positional_embedding": (8, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, width),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        shapes |= {block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,)}
        shapes |= {block + "attn.out_proj.weight": (width, width), block + "mlp.c_fc.weight": (4 * width, width)}
        shapes |= {block + "mlp.c_proj.weight": (width, 4 * width), block + "ln_1.weight": (width,)}
    return {prefix + n: s for n, s in shapes.items()}


def hf_view(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenCLIP checkpoint's text encoder in Hugging Face names, split by diffusers (q, k, v from in_proj)."""
    return convert_open_clip_checkpoint(None, tensors, prefix=prefix)


def clip_text(prefix: str, old_layout: bool = False) -> dict[str, tuple[int, ...]]:
    """A tiny Hugging Face CLIP text encoder under `prefix` (very old SD1 files lack `text_model.`): the names
    diffusers gives an OpenCLIP one."""
    hf = hf_view(random_tensors(openclip_text("")), "")
    return {prefix + (n.removeprefix("text_model.") if old_layout else n): tuple(t.shape) for n, t in hf.items()}


def text_modules(layers: int = 2) -> list[str]:
    """The Hugging Face CLIP modules sd-scripts adapts in a text encoder."""
    parts = [*(f"self_attn.{p}_proj" for p in (*QKV, "out")), "mlp.fc1", "mlp.fc2"]
    return [f"text_model.encoder.layers.{i}.{p}" for i in range(layers) for p in parts]


Factors = tuple[torch.Tensor, torch.Tensor, float]


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def save_lora(path: Path, modules: dict[str, tuple[int, ...]], rank: int = 2) -> dict[str, Factors]:
    """A kohya file: module name -> (out, in, *kernel) of the factors; every third module has no `.alpha`."""
    generator = torch.Generator().manual_seed(1)
    tensors, factors = {}, {}
    for i, (name, shape) in enumerate(modules.items()):
        down = torch.randn(rank, *shape[1:], generator=generator) * 0.3
        up = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=generator) * 0.3
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        alpha = None if i % 3 == 0 else float(1 + i % 4)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        factors[name] = (down, up, alpha if alpha is not None else float(rank))
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return factors


def delta(factors: Factors) -> torch.Tensor:
    """(alpha / r) · up @ down in fp64, as an (out, in·k·k) matrix."""
    down, up, alpha = factors
    rank = down.shape[0]
    return (alpha / rank) * (up.double().reshape(up.shape[0], rank) @ down.double().reshape(rank, -1))


def assert_close(actual: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert (actual.double() - want).abs().max().item() <= 1e-6 * want.abs().max().item(), name


def assert_merged(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor], targets: dict[str, Factors]) -> None:
    """Every tensor of `out` is base + Δ for the targets and bit-identical otherwise."""
    assert set(out) == set(base)
    for name, tensor in out.items():
        want = base[name].double()
        if name in targets:
            want = want + delta(targets[name]).reshape(want.shape)
        assert_close(tensor, want, name)
        assert torch.equal(tensor, base[name]) == (name not in targets), name  # changed exactly the targets


@pytest.mark.parametrize("old_text_layout", [False, True])
def test_kohya_on_an_sd1_ldm_single_file(tmp_path: Path, old_text_layout: bool) -> None:
    u = unet("sd1")
    text = clip_text(SD1_TEXT, old_text_layout)
    base = random_tensors({LDM + x: u.shapes[d] for x, d in u.ldm.items()} | text)
    save_file(base, tmp_path / "sd1.safetensors", metadata={"format": "pt", "modelspec.title": "tiny sd1"})
    names = {LDM + x: kohya("lora_unet", d) for x, d in u.weights().items()}
    stored = (lambda m: m.removeprefix("text_model.")) if old_text_layout else (lambda m: m)
    names |= {f"{SD1_TEXT}{stored(m)}.weight": kohya("lora_te", m) for m in text_modules()}
    factors = save_lora(tmp_path / "lora.safetensors", {k: base[n].shape for n, k in names.items()})
    lorasurgeon.merge(tmp_path / "sd1.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    assert_merged(read_tensors(tmp_path / "out.safetensors"), base, {n: factors[k] for n, k in names.items()})
    assert metadata_of(tmp_path / "out.safetensors")["modelspec.title"] == "tiny sd1"  # the base's metadata is kept
    assert any(len(base[n].shape) == 4 and base[n].shape[2:] == (3, 3) for n in names)  # conv 3×3 covered


@pytest.mark.parametrize(("prefix", "component"), [(SD2_TEXT, "lora_te"), (SDXL_TEXT2, "lora_te2")])
def test_kohya_on_openclip_text_encoders_with_fused_qkv(tmp_path: Path, prefix: str, component: str) -> None:
    """SD2's text encoder and SDXL's second one; the SD2 flavour also has a U-Net with Linear proj_in, which takes
    an SD1-style LoRA with 1×1 conv factors there (squeezed, as sd-scripts' merge_lora.py does)."""
    u = unet("sd2")
    unet_shapes = {LDM + x: u.shapes[d] for x, d in u.ldm.items()} if component == "lora_te" else {}
    base = random_tensors(unet_shapes | openclip_text(prefix))
    save_file(base, tmp_path / "base.safetensors")
    names = {LDM + x: kohya("lora_unet", d) for x, d in u.weights().items()} if unet_shapes else {}
    modules = {k: base[n].shape + ((1, 1) if ".proj_in." in n else ()) for n, k in names.items()}
    original = hf_view(base, prefix)
    modules |= {kohya(component, m): original[f"{m}.weight"].shape for m in text_modules()}
    factors = save_lora(tmp_path / "lora.safetensors", modules)
    lorasurgeon.merge(tmp_path / "base.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    out = read_tensors(tmp_path / "out.safetensors")
    merged = hf_view(out, prefix)
    for name, tensor in merged.items():  # the text encoder as diffusers reads it: every LoRA'd module moved
        module = kohya(component, name.removesuffix(".weight"))
        want = original[name].double() + (delta(factors[module]) if module in factors else 0)
        assert_close(tensor, want, name)
        assert torch.equal(tensor, original[name]) == (module not in factors), name
    assert sum(kohya(component, n) in factors for n in merged) == len(text_modules())
    unet_out = {n: t for n, t in out.items() if n.startswith(LDM)}
    assert_merged(unet_out, {n: base[n] for n in unet_out}, {n: factors[k] for n, k in names.items()})
    if unet_shapes:  # the 1×1 conv factors did land on Linear weights
        assert any(len(modules[k]) == 4 and len(base[n].shape) == 2 for n, k in names.items())


def diffusers_targets(lora: Path, layers_per_block: int) -> dict[str, str]:
    """kohya module -> the diffusers U-Net module diffusers' SDXL LoRA loader puts it on (lora_pipeline.py:
    _maybe_map_sgm_blocks_to_diffusers, _convert_non_diffusers_lora_to_diffusers, convert_unet_state_dict_to_peft)."""
    names = [k.removesuffix(".lora_down.weight") for k in read_tensors(lora) if k.endswith(".lora_down.weight")]
    tagged = {f"{n}.lora_{role}.weight": torch.tensor(float(i)) for i, n in enumerate(names) for role in ("down", "up")}
    mapped = _maybe_map_sgm_blocks_to_diffusers(tagged, type("Config", (), {"layers_per_block": layers_per_block}))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    return {names[int(v.item())]: k.removesuffix(".lora_A.weight") for k, v in peft.items() if ".lora_A." in k}


def test_sdxl_kohya_names_on_a_diffusers_unet(tmp_path: Path) -> None:
    u = unet("sdxl")
    (tmp_path / "unet").mkdir()
    base = random_tensors(u.shapes)
    save_file(base, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    modules = {kohya("lora_unet", x): u.shapes[d] for x, d in u.weights().items()}
    factors = save_lora(
        tmp_path / "lora.safetensors", modules | {"lora_te1_text_model_encoder_layers_0_mlp_fc1": (8, 4)}
    )
    targets = diffusers_targets(tmp_path / "lora.safetensors", layers_per_block=2)
    assert len(targets) == len(modules)
    summary = lorasurgeon.merge(tmp_path / "unet", [tmp_path / "lora.safetensors"], tmp_path / "out")
    expected = {f"{targets[k]}.weight": factors[k] for k in modules}
    assert_merged(read_tensors(tmp_path / "out"), base, expected)
    (skipped,) = summary.plan.warnings  # the text encoder module: this base is the U-Net component alone
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in skipped.message


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(1, 6),
    rank=st.integers(1, 3),
    parts=st.sets(st.sampled_from(QKV), min_size=1),
    weight=st.sampled_from([1.0, 0.5, -2.0]),
)
def test_fused_qkv_merge_adds_each_third_and_unmerge_restores(
    width: int, rank: int, parts: set[str], weight: float
) -> None:
    fused = f"{SDXL_TEXT2}transformer.resblocks.0.attn.in_proj_weight"
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        base = random_tensors({fused: (3 * width, width), f"{SDXL_TEXT2}transformer.resblocks.0.ln_1.weight": (width,)})
        save_file(base, tmp / "base.safetensors")
        modules = {kohya("lora_te2", f"text_model.encoder.layers.0.self_attn.{p}_proj"): (width, width) for p in parts}
        factors = save_lora(tmp / "lora.safetensors", modules, rank)
        lorasurgeon.merge(tmp / "base.safetensors", [tmp / "lora.safetensors"], tmp / "m.safetensors", weights=[weight])
        merged = read_tensors(tmp / "m.safetensors")[fused]
        for i, part in enumerate(QKV):
            rows = slice(i * width, (i + 1) * width)
            module = kohya("lora_te2", f"text_model.encoder.layers.0.self_attn.{part}_proj")
            want = base[fused][rows].double() + (weight * delta(factors[module]) if part in parts else 0)
            assert_close(merged[rows], want, part)
            assert torch.equal(merged[rows], base[fused][rows]) == (part not in parts), part
        lorasurgeon.unmerge(tmp / "m.safetensors", tmp / "lora.safetensors", tmp / "u.safetensors", scale=weight)
        restored = read_tensors(tmp / "u.safetensors")[fused]
        assert_close(restored, base[fused].double(), "unmerged")


def test_refuses_ambiguous_names_and_misfit_thirds(tmp_path: Path) -> None:
    # Both SD1 text encoder layouts in one file: the kohya name denotes two tensors, so it is refused, not guessed.
    shapes = clip_text(SD1_TEXT) | clip_text(SD1_TEXT, old_layout=True)
    save_file(random_tensors(shapes), tmp_path / "both.safetensors")
    name = kohya("lora_te", "text_model.encoder.layers.0.self_attn.q_proj")
    save_lora(tmp_path / "te.safetensors", {name: (16, 16)})
    message = refused(tmp_path / "both.safetensors", tmp_path / "te.safetensors", tmp_path / "o", "ambiguous")
    assert f"{SD1_TEXT}text_model.encoder.layers.0.self_attn.q_proj.weight" in message
    assert f"{SD1_TEXT}encoder.layers.0.self_attn.q_proj.weight" in message
    # A k_proj LoRA as tall as the whole fused tensor does not fit its third.
    save_file(random_tensors(openclip_text(SDXL_TEXT2)), tmp_path / "sdxl.safetensors")
    name = kohya("lora_te2", "text_model.encoder.layers.1.self_attn.k_proj")
    save_lora(tmp_path / "k.safetensors", {name: (48, 16)})
    message = refused(
        tmp_path / "sdxl.safetensors", tmp_path / "k.safetensors", tmp_path / "o", "rows 16:32 of the fused"
    )
    assert f"{name}.lora_down.weight -> {SDXL_TEXT2}transformer.resblocks.1.attn.in_proj_weight" in message
    # A fused tensor whose rows are not three equal parts.
    save_file(
        random_tensors({f"{SD2_TEXT}transformer.resblocks.0.attn.in_proj_weight": (16, 16)}),
        tmp_path / "odd.safetensors",
    )
    name = kohya("lora_te", "text_model.encoder.layers.0.self_attn.v_proj")
    save_lora(tmp_path / "v.safetensors", {name: (5, 16)})
    refused(tmp_path / "odd.safetensors", tmp_path / "v.safetensors", tmp_path / "o", "does not split into three")
