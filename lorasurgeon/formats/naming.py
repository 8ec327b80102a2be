"""Each module's name in the format convert writes: a PEFT module path, a diffusers `<component>.<path>`, or a kohya
name, resolved against BASE where the source's names alone do not say it (shared FORMATS.md §5.1-§5.7), and the
one table of pipeline components and kohya prefixes (`--component`).

kohya names cannot be turned back into module paths (every "." became "_", and names have "_" of their own,
§5.2), so converting from kohya needs BASE: each name is resolved against BASE's tensors by sd-scripts' forward
rule, exactly as a merge does (`Targets`, made by the caller from a merge plan). Converting to kohya names each
module by that rule, with the component prefix from the diffusers component, `component`, or the name BASE's own
layout gives its tensor. A PEFT adapter is for one model, so a diffusers file goes to PEFT one component at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasurgeon.adapter import Adapter, AdapterFormat, LoraModule
from lorasurgeon.errors import LorasurgeonError, MismatchError, Option, UnsupportedError
from lorasurgeon.formats import kohya_names
from lorasurgeon.formats.kohya import PREFIX_COMPONENTS, prefix_of

PIPELINE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer", "prior")
# `component`: a pipeline component, or a kohya prefix that names one (the one component <-> prefix table is
# kohya.PREFIX_COMPONENTS).
COMPONENTS: dict[str, str] = {c: c for c in PIPELINE_COMPONENTS} | {p: c for p, c in PREFIX_COMPONENTS.items() if c}


@dataclass(frozen=True)
class Targets:
    """What BASE says about the modules: the tensor each resolves to, and the kohya names of its tensors."""

    tensors: dict[str, str]  # module -> base tensor
    kohya: dict[str, list[str]]  # base tensor -> its kohya names in BASE's layout
    component: str | None = None  # the pipeline component BASE's layout says it is (a diffusers `unet/`, ...)


def layout_component(root: Path, config: Mapping[str, Any] | None) -> str | None:
    """The pipeline component a base checkpoint is, from its layout: a diffusers pipeline's sub-directory (`unet/`,
    `text_encoder/`, ...), or a diffusers model config naming a U-Net or a transformer; None for anything else."""
    if root.name in PIPELINE_COMPONENTS:
        return root.name
    name = (config or {}).get("_class_name")
    if not isinstance(name, str):
        return None
    return "unet" if name.startswith("UNet") else "transformer" if name.endswith("Transformer2DModel") else None


def component_of(module: LoraModule) -> str:
    """The diffusers component a kohya or diffusers module belongs to ("" when unknown, and for PEFT)."""
    return module.component


def target_names(
    adapter: Adapter, modules: list[LoraModule], to: AdapterFormat, component: str | None, base: Targets | None
) -> list[str]:
    """Each module's name in the `to` format; UnsupportedError when two modules would share one."""
    if to == "peft":
        _one_model(adapter, modules)
        names = [_peft_path(adapter, m, base) for m in modules]
    elif to == "diffusers":
        names = [_diffusers_name(adapter, m, base, component) for m in modules]
    else:
        names = [_kohya_name(adapter, m, base, _kohya_prefix(adapter, m, component)) for m in modules]
    seen: dict[str, LoraModule] = {}
    for name, m in zip(names, modules, strict=True):
        if name in seen:
            raise UnsupportedError(f"{seen[name].a.name} and {m.a.name} would both be named {name} in the {to} file")
        seen[name] = m
    return names


def _one_model(adapter: Adapter, modules: list[LoraModule]) -> None:
    """A PEFT adapter is loaded onto one model: a diffusers file converts one component at a time."""
    components = sorted({m.component for m in modules} - {""})
    if adapter.format == "diffusers" and len(components) > 1:
        raise LorasurgeonError(
            f"{adapter.path}: holds modules of {' and '.join(components)}, but a PEFT adapter is for one model; pass ",
            Option("component"),
            " to convert one of them",
        )


def _peft_path(adapter: Adapter, module: LoraModule, base: Targets | None) -> str:
    """The module path in the model the adapter is loaded onto (kohya: BASE's tensor, minus `.weight`)."""
    if adapter.format == "kohya":
        return _base_tensor(adapter, module, base).removesuffix(".weight")
    return module.module.partition(".")[2] if adapter.format == "diffusers" else module.module


def _base_tensor(adapter: Adapter, module: LoraModule, base: Targets | None) -> str:
    if base is None:
        raise LorasurgeonError(
            f"{adapter.path}: {module.a.name}: a kohya name cannot be turned back into a module path (every '.' "
            "became '_', and names have '_' of their own); pass ",
            Option("base"),
            " with the checkpoint the LoRA belongs to, whose tensor names resolve it",
        )
    return base.tensors[module.module]


def _diffusers_name(adapter: Adapter, module: LoraModule, base: Targets | None, component: str | None) -> str:
    """`<component>.<module path>`: the file's own name, the kohya prefix's component and BASE's path, or
    `component` and the PEFT module path."""
    if adapter.format == "diffusers":
        return module.module
    if adapter.format == "kohya":
        prefix = prefix_of(module.module)
        tensor = _base_tensor(adapter, module, base)
        if not module.component:
            known = ", ".join(p for p, c in PREFIX_COMPONENTS.items() if c)
            raise UnsupportedError(
                f"{module.a.name}: its kohya prefix {prefix or '(none)'} names no diffusers component (known: {known})"
            )
        if kohya_names.is_sai_unet(tensor):
            raise UnsupportedError(
                f"{module.a.name} -> {tensor}: BASE stores the U-Net under SAI names (input_blocks, ...), which "
                "are not diffusers module paths; convert against the diffusers-layout unet/ checkpoint instead"
            )
        return f"{module.component}.{kohya_names.inner_path(tensor)}"
    if component is None:
        raise LorasurgeonError(
            f"{adapter.path}: a diffusers file names every module under its pipeline component; pass ",
            Option("component"),
            f" ({', '.join(PIPELINE_COMPONENTS)}) to say which this adapter is for",
        )
    return f"{COMPONENTS[component]}.{module.module}"


def _kohya_prefix(adapter: Adapter, module: LoraModule, component: str | None) -> str | None:
    """The kohya prefix asked for (component lora_*), or the one of the module's diffusers component."""
    if component is not None and component.startswith("lora_"):
        return component
    if adapter.format == "diffusers":
        diffusers = module.component
    elif adapter.format == "peft" and component is not None:
        diffusers = COMPONENTS[component]
    else:
        return None
    sdxl = any(m.component == "text_encoder_2" for m in adapter.modules)
    prefix = kohya_names.prefix_for(diffusers, sdxl)
    if prefix is None:
        raise UnsupportedError(
            f"{module.a.name}: the {diffusers} component has no kohya prefix (sd-scripts names Flux and SD3 "
            "transformers in its own layout, which lorasurgeon has no table for)"
        )
    return prefix


def _kohya_name(adapter: Adapter, module: LoraModule, base: Targets | None, prefix: str | None) -> str:
    """sd-scripts' forward rule (FORMATS.md §5.1): prefix + module path with every "." replaced by "_"; with
    BASE, the name its layout gives the module's tensor."""
    if adapter.format == "kohya":
        return module.module
    if base is not None:
        tensor = base.tensors[module.module]
        names = [n for n in base.kohya.get(tensor, []) if prefix is None or prefix_of(n) == prefix]
        if len(names) > 1:
            raise LorasurgeonError(
                f"{module.a.name} -> {tensor}: BASE's layout allows {', '.join(names)}; pass ",
                Option("component"),
                " with the kohya prefix to use",
            )
        if not names:
            wanted = f" with prefix {prefix}" if prefix else ""
            raise MismatchError(f"{module.a.name} -> {tensor}: sd-scripts' naming gives this tensor no name{wanted}")
        return names[0]
    if prefix is None:
        raise LorasurgeonError(
            f"{adapter.path}: kohya names start with the component (lora_unet, lora_te, lora_te1, lora_te2); pass ",
            Option("component"),
            ", or ",
            Option("base"),
            " with a checkpoint whose layout gives it",
        )
    path = module.module.partition(".")[2] if adapter.format == "diffusers" else module.module
    return f"{prefix}_{path.replace('.', '_')}"
