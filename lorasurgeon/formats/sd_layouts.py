"""Stable Diffusion checkpoint layouts, and the module path sd-scripts gives each stored tensor (FORMATS.md §5.2).

sd-scripts names a LoRA module after the network it trains: diffusers paths for SD1/2 U-Nets, SAI ("sgm") paths for
SDXL U-Nets, Hugging Face CLIP paths for every text encoder. A checkpoint stores one layout; these tables give each
of its tensors the path it has in the other layout, so kohya names are computed forwards from the checkpoint and
never guessed backwards from a LoRA. The U-Net rules restate diffusers' LDM converter
(`loaders/single_file_utils.py::convert_ldm_unet_checkpoint`) and its SDXL LoRA block remap
(`loaders/lora_conversion_utils.py::_maybe_map_sgm_blocks_to_diffusers`); the text encoder rules its OpenCLIP
converter (`convert_open_clip_checkpoint`) and ComfyUI's handling of old SD1 files (`comfy/sd.py::load_clip_weights`).

All names here are tensor names; U-Net names are relative to the U-Net (no `model.diffusion_model.`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

LDM_UNET = "model.diffusion_model."

# LDM ResBlock children -> diffusers ResnetBlock2D children.
RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# U-Net modules outside the down/mid/up blocks, LDM -> diffusers; label_emb is SDXL's added-conditioning MLP.
UNET_OUTSIDE = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
# The middle block's three children, LDM -> diffusers.
MIDDLE = {
    "middle_block.0": "mid_block.resnets.0",
    "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
}

# Single-file OpenCLIP text encoders (SD2; SDXL's second) -> the kohya component sd-scripts trains them as.
OPENCLIP = {"cond_stage_model.model.": "lora_te", "conditioner.embedders.1.model.": "lora_te2"}
OPENCLIP_LAYER = re.compile(r"transformer\.resblocks\.(?P<index>\d+)\.(?P<rest>.+)")
# OpenCLIP resblock Linear weights -> Hugging Face CLIP encoder-layer modules.
OPENCLIP_PARTS = {
    "attn.out_proj.weight": "self_attn.out_proj",
    "mlp.c_fc.weight": "mlp.fc1",
    "mlp.c_proj.weight": "mlp.fc2",
}
# `attn.in_proj_weight` stacks q, k and v in this order: rows [0:d], [d:2d], [2d:3d].
FUSED_WEIGHT = "attn.in_proj_weight"
FUSED_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# The SD1 single-file text encoder (Hugging Face CLIP); very old files store it without the `text_model.` level.
SD1_TEXT = "cond_stage_model.transformer."
SDXL_TEXT1 = "conditioner.embedders.0.transformer."
# transformers 5 holds and saves a CLIPTextModel without `text_model.` (`encoder.layers.*`); sd-scripts, diffusers'
# conversions and ComfyUI's key map name its modules with it. Both names resolve in both stored layouts, as
# diffusers applies both (it strips `text_model.` when the model has none); convert writes the `text_model` one.
TEXT_MODEL = "text_model."
FLAT_TEXT = "encoder.layers."
TEXT_PREFIXES = ("lora_te", "lora_te1", "lora_te2")


def kohya_paths(tensor_names: Sequence[str]) -> list[tuple[str, str, str]]:
    """(tensor, kohya component, module path) for each weight whose path in sd-scripts' network is not its stored
    name: LDM U-Nets (diffusers paths, for SD1/2 LoRAs), diffusers U-Nets (SAI paths, for SDXL LoRAs), OpenCLIP
    text encoders (Hugging Face paths; a fused q/k/v tensor has three) and old SD1 text encoders.

    `model.diffusion_model.input_blocks.1.1.proj_in.weight` -> (it, "lora_unet", "down_blocks.0.attentions.0.proj_in")
    """
    found = []
    unet = [n.removeprefix(LDM_UNET) for n in tensor_names if n.startswith(LDM_UNET) and n.endswith(".weight")]
    to_diffusers = unet_table(*ldm_shape(unet))
    for name in unet:
        path = renamed(name.removesuffix(".weight"), to_diffusers)
        if path is not None:
            found.append((LDM_UNET + name, "lora_unet", path))
    to_ldm = {new: old for old, new in unet_table(*diffusers_shape(tensor_names)).items()}
    for name in tensor_names:
        path = renamed(name.removesuffix(".weight"), to_ldm) if name.endswith(".weight") else None
        if path is not None:
            found.append((name, "lora_unet", path))
        found += [(name, component, path) for component, path in _text_paths(name)]
    return found


def unet_table(layers: int, levels: int, attended: Collection[int]) -> dict[str, str]:
    """LDM module path -> diffusers module path, for every module of a U-Net with `levels` down blocks of `layers`
    resnets and up blocks of `layers + 1`; `attended` are the up blocks that have attentions (an upsampler is LDM
    child 2 of its block after an attention, else child 1). Resnets are listed by child, so the table is a
    bijection: inverted, it maps diffusers paths to LDM (SAI) paths.
    """
    table = dict(UNET_OUTSIDE)
    blocks = dict(MIDDLE)
    for level in range(levels):
        for at in range(layers):
            index = 1 + level * (layers + 1) + at
            blocks[f"input_blocks.{index}.0"] = f"down_blocks.{level}.resnets.{at}"
            blocks[f"input_blocks.{index}.1"] = f"down_blocks.{level}.attentions.{at}"
        for at in range(layers + 1):
            index = level * (layers + 1) + at
            blocks[f"output_blocks.{index}.0"] = f"up_blocks.{level}.resnets.{at}"
            blocks[f"output_blocks.{index}.1"] = f"up_blocks.{level}.attentions.{at}"
        if level < levels - 1:
            table[f"input_blocks.{(level + 1) * (layers + 1)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            child = 2 if level in attended else 1
            table[f"output_blocks.{level * (layers + 1) + layers}.{child}.conv"] = (
                f"up_blocks.{level}.upsamplers.0.conv"
            )
    for old, new in blocks.items():
        if ".resnets." in new:
            table |= {f"{old}.{part}": f"{new}.{diffusers}" for part, diffusers in RESNET_PARTS.items()}
        else:
            table[old] = new
    return table


def ldm_shape(names: Sequence[str]) -> tuple[int, int, frozenset[int]]:
    """(layers, levels, attended up blocks) of an LDM U-Net from its tensor names (see `unet_table`).

    The first downsampler is input block `layers + 1`; with one level there is none, and the input blocks are
    conv_in and 1..layers.
    """
    downsamplers = {int(m[1]) for n in names if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", n))}
    inputs = [int(m[1]) for n in names if (m := re.match(r"input_blocks\.(\d+)\.", n))]
    layers = min(downsamplers) - 1 if downsamplers else max(inputs, default=0)
    attentions = {int(m[1]) for n in names if (m := re.match(r"output_blocks\.(\d+)\.1\.(?!conv\.)", n))}
    return layers, len(downsamplers) + 1, frozenset(i // (layers + 1) for i in attentions)


def diffusers_shape(names: Sequence[str]) -> tuple[int, int, frozenset[int]]:
    """(layers, levels, attended up blocks) of a diffusers U-Net from its tensor names (see `unet_table`)."""
    resnets = [int(m[1]) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))]
    levels = {int(m[1]) for n in names if (m := re.match(r"down_blocks\.(\d+)\.", n))}
    attended = frozenset(int(m[1]) for n in names if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", n)))
    return 1 + max(resnets, default=-1), len(levels), attended


def renamed(path: str, table: Mapping[str, str]) -> str | None:
    """`path` with its longest leading module path that `table` has replaced, or None when it has none.

    `input_blocks.1.0.in_layers.2` with {`input_blocks.1.0.in_layers.2`: `down_blocks.0.resnets.0.conv1`} ->
    `down_blocks.0.resnets.0.conv1`.
    """
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in table:
            return ".".join([table[prefix], *parts[end:]])
    return None


def fused_rows(module: str, tensor: str, rows: int) -> tuple[int, int] | None:
    """The rows of a fused OpenCLIP `in_proj_weight` (`rows` in all) that kohya module `module` changes: q, k and v
    are stacked in thirds. None when `tensor` is not fused, or `module` is not one of its q/k/v projections."""
    if not tensor.endswith("." + FUSED_WEIGHT):
        return None
    part = next((i for i, p in enumerate(FUSED_QKV) if module.endswith("_" + p.replace(".", "_"))), None)
    if part is None:
        return None
    size = rows // 3
    return part * size, (part + 1) * size


def _text_paths(name: str) -> list[tuple[str, str]]:
    """(kohya component, Hugging Face CLIP module path) of a single-file text encoder weight in another layout."""
    for prefix, component in OPENCLIP.items():
        layer = OPENCLIP_LAYER.fullmatch(name.removeprefix(prefix)) if name.startswith(prefix) else None
        if layer is None:
            continue
        path = f"text_model.encoder.layers.{layer['index']}"
        if layer["rest"] == FUSED_WEIGHT:
            return [(component, f"{path}.{part}") for part in FUSED_QKV]
        part = OPENCLIP_PARTS.get(layer["rest"])
        return [] if part is None else [(component, f"{path}.{part}")]
    inner = name.removeprefix(SD1_TEXT)
    if name.startswith(SD1_TEXT) and not inner.startswith("text_model.") and name.endswith(".weight"):
        return [("lora_te", "text_model." + inner.removesuffix(".weight"))]
    return _text_model_aliases(name)


def _text_model_aliases(name: str) -> list[tuple[str, str]]:
    """The other reading of a CLIP text encoder weight: with `text_model.` for a transformers-5 file
    (`encoder.layers.0.self_attn.q_proj`), without it for a `text_model.*` one (single files: their component)."""
    path = name.removesuffix(".weight")
    if path == name:
        return []
    if path.startswith(FLAT_TEXT):
        return [(component, TEXT_MODEL + path) for component in TEXT_PREFIXES]
    if path.startswith(TEXT_MODEL + FLAT_TEXT):
        return [(component, path.removeprefix(TEXT_MODEL)) for component in TEXT_PREFIXES]
    for prefix, component in ((SD1_TEXT, "lora_te"), (SDXL_TEXT1, "lora_te1")):
        inner = path.removeprefix(prefix)
        if path.startswith(prefix) and inner.startswith(TEXT_MODEL + FLAT_TEXT):
            return [(component, inner.removeprefix(TEXT_MODEL))]
    return []


def text_model_path(path: str) -> str:
    """A CLIP text encoder module path as sd-scripts, diffusers and ComfyUI name it: `text_model.` put back on a
    transformers-5 path (`encoder.layers.0.mlp.fc1` -> `text_model.encoder.layers.0.mlp.fc1`)."""
    return TEXT_MODEL + path if path.startswith(FLAT_TEXT) else path
