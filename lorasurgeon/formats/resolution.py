"""Resolving an adapter's module names against a base checkpoint's tensor names, whatever the format (shared
FORMATS.md §1.5, §5.2): PEFT and diffusers module paths with and without the model's base prefix (a diffusers
path's component is such a prefix), kohya names by sd-scripts' forward rule.

The plan asks a `BaseNames` for each module's candidates and for how the module meets the tensor it names; it
never needs to know which format named the module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.errors import Finding
from lorasurgeon.formats import kohya_names
from lorasurgeon.formats.architectures import tensor_candidates
from lorasurgeon.formats.kohya import prefix_of
from lorasurgeon.header import TensorInfo


class BaseNames:
    """A base checkpoint's tensor names, as each naming convention sees them (the kohya table is built on first
    use: a PEFT merge never pays for it)."""

    def __init__(self, tensors: Mapping[str, TensorInfo]) -> None:
        self.tensors = tensors
        self._kohya: dict[str, list[str]] | None = None

    def candidates(self, module: LoraModule) -> list[str]:
        """The base tensors `module`'s weight may be."""
        if module.naming == "kohya":
            if self._kohya is None:
                self._kohya = kohya_names.kohya_names(self.tensors)
            return self._kohya.get(module.module, [])
        return [c for c in tensor_candidates(module.module, "weight") if c in self.tensors]

    def unmatched(self, module: LoraModule) -> str:
        """Why no base tensor is found for `module`."""
        if module.naming == "kohya":
            return kohya_names.UNMATCHED
        return f"target {module.target} is not in the base checkpoint"

    def view(self, module: LoraModule, info: TensorInfo) -> tuple[LoraModule, tuple[int, int] | None, str]:
        """`module` as it applies to `info`, the rows of `info` it changes (None: all) and a problem, if any."""
        return kohya_names.view(module, info) if module.naming == "kohya" else (module, None, "")

    def skipped(self, adapter: Adapter) -> dict[str, Finding]:
        """Modules of a pipeline component the base does not hold (the text encoder's, when BASE is `unet/`):
        skipped with a warning each. In a single-file SD/SDXL checkpoint every component is present, and a module
        that matches nothing is an error, as is every module when none matches."""
        grouped = [m for m in adapter.modules if m.naming == "kohya" or m.component]
        if not grouped or (any(m.naming == "kohya" for m in grouped) and self._single_file_sd()):
            return {}
        present = {_group(m) for m in grouped if self.candidates(m)}
        if not present:
            return {}
        return {
            m.module: Finding.of(
                "warning", f"{m.a.name}: the base holds no {_group(m)} modules, so it is skipped", adapter_key=m.a.name
            )
            for m in grouped
            if _group(m) not in present
        }

    def _single_file_sd(self) -> bool:
        return any(kohya_names.is_sai_unet(n) for n in self.tensors)


def _group(module: LoraModule) -> str:
    """The component a module is grouped under for skipping: its kohya prefix (lora_te1), or its component."""
    return prefix_of(module.module) if module.naming == "kohya" else module.component


def kohya_names_of(tensor_names: Sequence[str]) -> dict[str, list[str]]:
    """Every base tensor's kohya names in its checkpoint's own layout (one name per tensor where the layout
    allows several); a name shared by two tensors names neither."""
    own: dict[str, list[str]] = {}
    for name, tensors in kohya_names.kohya_names(tensor_names).items():
        if len(tensors) == 1 and kohya_names.own_name(name, tensors[0]):
            own.setdefault(tensors[0], []).append(name)
    return own
