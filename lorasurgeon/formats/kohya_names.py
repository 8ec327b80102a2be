"""kohya names against a base checkpoint: sd-scripts' forward naming rule applied to the base's own tensor names,
and how a kohya module meets the tensor it names (shared FORMATS.md §5.2, §5.3).

Replacing "." by "_" cannot be inverted (names have "_" of their own), so a kohya name is never turned back into a
path: every base tensor is named forwards, by each layout sd-scripts may have trained it in (sd_layouts), and the
LoRA's names are looked up in that table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from lorasurgeon.adapter import LoraModule
from lorasurgeon.formats import sd_layouts
from lorasurgeon.formats.kohya import PREFIX_COMPONENTS, prefix_of
from lorasurgeon.header import TensorInfo

# Checkpoint name prefix -> the kohya prefixes its modules may carry (FORMATS.md §5.2). "" stands for a diffusers
# component file (unet/, text_encoder/, text_encoder_2/), whose names are sd-scripts' module paths. Layouts whose
# stored names are not sd-scripts' module paths (SD1/2 LDM-layout U-Nets, SDXL kohya names on a diffusers U-Net,
# OpenCLIP text encoders with fused q/k/v) are converted by sd_layouts.
LAYOUT_PREFIXES: dict[str, tuple[str, ...]] = {
    "model.diffusion_model.": ("lora_unet",),  # SDXL single file: SAI U-Net names verbatim
    "conditioner.embedders.0.transformer.": ("lora_te1",),  # SDXL text encoder 1 (HF CLIP names)
    "cond_stage_model.transformer.": ("lora_te",),  # SD1 single file: HF CLIP text encoder
    "": ("lora_unet", "lora_te", "lora_te1", "lora_te2"),
}
UNMATCHED = (
    "no base tensor has this kohya name under sd-scripts' naming rule (applied to the base's own tensor names, to "
    "the diffusers and SAI names of its U-Net, and to the Hugging Face CLIP names of its text encoders)"
)


def kohya_names(tensor_names: Iterable[str]) -> dict[str, list[str]]:
    """sd-scripts' forward naming rule applied to every `.weight` of a checkpoint: kohya module name -> the
    checkpoint tensors it may denote (more than one: ambiguous).

    A tensor stored in another layout than sd-scripts trains (sd_layouts) is named by its path there too; the three
    q/k/v modules of a fused OpenCLIP `in_proj_weight` all denote that one tensor (sd_layouts.fused_rows says which
    rows).
    """
    tensor_names = list(tensor_names)
    names: dict[str, list[str]] = {}
    for name in tensor_names:
        if not name.endswith(".weight"):
            continue
        for prefix, components in LAYOUT_PREFIXES.items():
            if name.startswith(prefix):
                path = name[len(prefix) : -len(".weight")].replace(".", "_")
                for component in components:
                    names.setdefault(f"{component}_{path}", []).append(name)
    for name, component, module in sd_layouts.kohya_paths(tensor_names):
        found = names.setdefault(f"{component}_{module.replace('.', '_')}", [])
        if name not in found:
            found.append(name)
    return names


def view(module: LoraModule, info: TensorInfo) -> tuple[LoraModule, tuple[int, int] | None, str]:
    """How a kohya module meets its tensor (FORMATS.md §5.2, §5.3): 1×1 conv factors on a Linear base are used as
    matrices (sd-scripts merges an SD1 conv proj_in LoRA into SD2/SDXL's Linear proj_in so), and a q/k/v module on a
    fused OpenCLIP in_proj_weight changes its third of the rows; the problem, when the tensor does not split."""
    if not info.shape:
        return module, None, ""
    pointwise = all(k == 1 for k in (*module.a.shape[2:], *module.b.shape[2:]))
    if module.kind == "conv" and len(info.shape) == 2 and pointwise:
        module = dataclasses.replace(module, kind="linear")
    rows = sd_layouts.fused_rows(module.module, info.name, info.shape[0])
    if rows is not None and info.shape[0] % 3:
        return module, None, f"a fused q/k/v tensor of {info.shape[0]} rows does not split into three equal parts"
    return module, rows, ""


def own_name(name: str, tensor: str) -> bool:
    """Whether `name` is the kohya name of `tensor` in its checkpoint's own layout: under a single file's prefix
    (model.diffusion_model. -> lora_unet), not the component-file reading of the whole tensor name."""
    prefix = next((p for p in LAYOUT_PREFIXES if p and tensor.startswith(p)), "")
    component = prefix_of(name)
    path = tensor[len(prefix) :].removesuffix(".weight")
    if component in sd_layouts.TEXT_PREFIXES:  # a transformers-5 text encoder: the name with text_model
        path = sd_layouts.text_model_path(path)
    return component in LAYOUT_PREFIXES[prefix] and name == f"{component}_{path.replace('.', '_')}"


def inner_path(tensor: str) -> str:
    """A single-file tensor's module path inside its component (`conditioner.embedders.0.transformer.` removed)."""
    inner = next((tensor[len(p) :] for p in LAYOUT_PREFIXES if p and tensor.startswith(p)), tensor)
    return inner.removesuffix(".weight")


def is_sai_unet(tensor: str) -> bool:
    """A U-Net tensor stored under SAI names (input_blocks, ...), which are not diffusers module paths."""
    return tensor.startswith(sd_layouts.LDM_UNET)


def prefix_for(component: str, sdxl: bool) -> str | None:
    """The kohya prefix of a pipeline component (SDXL's first text encoder is lora_te1), None when it has none."""
    if component == "text_encoder":
        return "lora_te1" if sdxl else "lora_te"
    return next((p for p, c in PREFIX_COMPONENTS.items() if c and c == component), None)
