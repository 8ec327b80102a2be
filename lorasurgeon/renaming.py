"""Each module's name in the format convert writes: a PEFT module path, a diffusers `<component>.<path>`, or a
kohya name, resolved against BASE where the source's names alone do not say it (shared FORMATS.md §5.1-§5.7).

kohya names cannot be turned back into module paths (every "." became "_", and names have "_" of their own,
§5.2), so converting from kohya needs BASE: the plan resolves each name against BASE's tensors by sd-scripts'
forward rule, exactly as a merge does. Converting to kohya names each module by that rule, with the component
prefix from the diffusers component, --component, or the name BASE's own layout gives its tensor. A PEFT
adapter is for one model, so a diffusers file goes to PEFT one component at a time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lorasurgeon import keys
from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import LorasurgeonError, MismatchError, UnsupportedError
from lorasurgeon.plan import plan_surgery

# diffusers component -> kohya prefix; SDXL's first text encoder is lora_te1 (taken when text_encoder_2 is there).
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SAI_UNET = "model.diffusion_model."  # its module names (input_blocks, ...) are not diffusers module paths


@dataclass(frozen=True)
class BaseNames:
    """What BASE says about the modules: the tensor each resolves to, and the kohya names of its tensors."""

    targets: dict[str, str]
    kohya: dict[str, list[str]]


def component_of(adapter: Adapter, module: LoraModule) -> str:
    """The diffusers component a kohya or diffusers module belongs to ("" when unknown, and for PEFT)."""
    if adapter.format == "kohya":
        return keys.COMPONENTS.get(keys.kohya_component(module.module), "")
    return module.module.partition(".")[0] if adapter.format == "diffusers" else ""


def resolve(adapter: Adapter, modules: list[LoraModule], base_path: Path) -> BaseNames:
    """Every module's tensor in BASE, found as a merge finds it (plan.py: PEFT paths with and without the model
    prefix, kohya names by sd-scripts' forward rule); MismatchError when one does not resolve or fit."""
    selected = dataclasses.replace(adapter, modules=tuple(modules), ignored=())
    with Checkpoint.open(base_path) as base:
        plan = plan_surgery("merge", base, [selected], [1.0], allow_nonfinite=True)  # NaNs are copied, not merged
        names = keys.kohya_names(base.tensors)
    if plan.errors:
        more = f" (and {len(plan.errors) - 1} more problems)" if len(plan.errors) > 1 else ""
        raise MismatchError(f"{plan.errors[0].message} (BASE {base_path}){more}")
    targets = {t.module.module: s.tensor.name for s in plan.steps for t in s.terms if not t.bias}
    missing = [m for m in modules if m.module not in targets]
    if missing:
        more = f" (and {len(missing) - 1} more modules)" if len(missing) > 1 else ""
        raise MismatchError(
            f"{missing[0].a.name}: BASE {base_path} holds no tensor for it{more}; pass --component to convert "
            "only the modules of one component"
        )
    kohya: dict[str, list[str]] = {}
    for name, tensors in names.items():
        if len(tensors) == 1 and _own_name(name, tensors[0]):  # a name shared by two tensors names neither
            kohya.setdefault(tensors[0], []).append(name)
    return BaseNames(targets, kohya)


def _own_name(name: str, tensor: str) -> bool:
    """Whether `name` is the kohya name of `tensor` in its checkpoint's own layout: under a single file's prefix
    (model.diffusion_model. -> lora_unet), not the component-file reading of the whole tensor name."""
    prefix = next((p for p in keys.KOHYA_PREFIXES if p and tensor.startswith(p)), "")
    component = keys.kohya_component(name)
    path = tensor[len(prefix) :].removesuffix(".weight").replace(".", "_")
    return component in keys.KOHYA_PREFIXES[prefix] and name == f"{component}_{path}"


def target_names(
    adapter: Adapter, modules: list[LoraModule], to: str, component: str | None, base: BaseNames | None
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
    components = sorted({component_of(adapter, m) for m in modules} - {""})
    if adapter.format == "diffusers" and len(components) > 1:
        raise LorasurgeonError(
            f"{adapter.path}: holds modules of {' and '.join(components)}, but a PEFT adapter is for one model; "
            "pass --component to convert one of them"
        )


def _peft_path(adapter: Adapter, module: LoraModule, base: BaseNames | None) -> str:
    """The module path in the model the adapter is loaded onto (kohya: BASE's tensor, minus `.weight`)."""
    if adapter.format == "kohya":
        return _base_tensor(adapter, module, base).removesuffix(".weight")
    return module.module.partition(".")[2] if adapter.format == "diffusers" else module.module


def _base_tensor(adapter: Adapter, module: LoraModule, base: BaseNames | None) -> str:
    if base is None:
        raise LorasurgeonError(
            f"{adapter.path}: {module.a.name}: a kohya name cannot be turned back into a module path (every '.' "
            "became '_', and names have '_' of their own); pass --base with the checkpoint the LoRA belongs to, "
            "whose tensor names resolve it"
        )
    return base.targets[module.module]


def _diffusers_name(adapter: Adapter, module: LoraModule, base: BaseNames | None, component: str | None) -> str:
    """`<component>.<module path>`: the file's own name, the kohya prefix's component and BASE's path, or
    --component and the PEFT module path."""
    if adapter.format == "diffusers":
        return module.module
    if adapter.format == "kohya":
        prefix = keys.kohya_component(module.module)
        tensor = _base_tensor(adapter, module, base)
        if prefix not in keys.COMPONENTS:
            raise UnsupportedError(
                f"{module.a.name}: its kohya prefix {prefix or '(none)'} names no diffusers component "
                f"(known: {', '.join(c for c in keys.COMPONENTS if c.startswith('lora_'))})"
            )
        if tensor.startswith(SAI_UNET):
            raise UnsupportedError(
                f"{module.a.name} -> {tensor}: BASE stores the U-Net under SAI names (input_blocks, ...), which "
                "are not diffusers module paths; convert against the diffusers-layout unet/ checkpoint instead"
            )
        inner = next((tensor[len(p) :] for p in keys.KOHYA_PREFIXES if p and tensor.startswith(p)), tensor)
        return f"{keys.COMPONENTS[prefix]}.{inner.removesuffix('.weight')}"
    if component is None:
        raise LorasurgeonError(
            f"{adapter.path}: a diffusers file names every module under its pipeline component; pass --component "
            f"({', '.join(c for c in keys.COMPONENTS if not c.startswith('lora_'))}) to say which this adapter is for"
        )
    return f"{keys.COMPONENTS[component]}.{module.module}"


def _kohya_prefix(adapter: Adapter, module: LoraModule, component: str | None) -> str | None:
    """The kohya prefix asked for (--component lora_*), or the one of the module's diffusers component."""
    if component is not None and component.startswith("lora_"):
        return component
    if adapter.format == "diffusers":
        diffusers = component_of(adapter, module)
    elif adapter.format == "peft" and component is not None:
        diffusers = keys.COMPONENTS[component]
    else:
        return None
    if diffusers not in KOHYA_PREFIXES:
        raise UnsupportedError(
            f"{module.a.name}: the {diffusers} component has no kohya prefix (sd-scripts names Flux and SD3 "
            "transformers in its own layout, which lorasurgeon has no table for)"
        )
    sdxl = any(component_of(adapter, m) == "text_encoder_2" for m in adapter.modules)
    return "lora_te1" if diffusers == "text_encoder" and sdxl else KOHYA_PREFIXES[diffusers]


def _kohya_name(adapter: Adapter, module: LoraModule, base: BaseNames | None, prefix: str | None) -> str:
    """sd-scripts' forward rule (FORMATS.md §5.1): prefix + module path with every "." replaced by "_"; with
    BASE, the name its layout gives the module's tensor."""
    if adapter.format == "kohya":
        return module.module
    if base is not None:
        tensor = base.targets[module.module]
        names = [n for n in base.kohya.get(tensor, []) if prefix is None or keys.kohya_component(n) == prefix]
        if len(names) > 1:
            raise LorasurgeonError(
                f"{module.a.name} -> {tensor}: BASE's layout allows {', '.join(names)}; pass --component with "
                "the kohya prefix to use"
            )
        if not names:
            wanted = f" with prefix {prefix}" if prefix else ""
            raise MismatchError(f"{module.a.name} -> {tensor}: sd-scripts' naming gives this tensor no name{wanted}")
        return names[0]
    if prefix is None:
        raise LorasurgeonError(
            f"{adapter.path}: kohya names start with the component (lora_unet, lora_te, lora_te1, lora_te2); "
            "pass --component, or --base with a checkpoint whose layout gives it"
        )
    path = module.module.partition(".")[2] if adapter.format == "diffusers" else module.module
    return f"{prefix}_{path.replace('.', '_')}"
