"""Resolving an adapter's module names against a base checkpoint's tensor names, whatever the format (shared
FORMATS.md §1.5, §5.2): PEFT and diffusers module paths with and without the model's base prefix (a diffusers
path's component is such a prefix), then through the transformers-5 naming convention of the model in the base's
config.json (transformers_names: in-memory names such as LLaVA's `model.language_model.…` on a legacy file), kohya
names by sd-scripts' forward rule.

The plan asks a `BaseNames` for each module's candidates and for how the module meets the tensor it names; it
never needs to know which format named the module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.errors import Finding
from lorasurgeon.formats import kohya_names
from lorasurgeon.formats.architectures import tensor_candidates
from lorasurgeon.formats.kohya import prefix_of
from lorasurgeon.formats.transformers_names import checkpoint_names
from lorasurgeon.header import TensorInfo


class BaseNames:
    """A base checkpoint's tensor names, as each naming convention sees them (the kohya table is built on first
    use: a PEFT merge never pays for it); `config` is the base's config.json, whose model type and architecture
    choose the transformers naming convention."""

    def __init__(self, tensors: Mapping[str, TensorInfo], config: Mapping[str, Any] | None = None) -> None:
        self.tensors = tensors
        self.config = config or {}
        self._kohya: dict[str, list[str]] | None = None

    def candidates(self, module: LoraModule) -> list[str]:
        """The base tensors `module`'s weight may be."""
        if module.naming == "kohya":
            if self._kohya is None:
                self._kohya = kohya_names.kohya_names(self.tensors)
            return self._kohya.get(module.module, [])
        return self.named(module.module, module.parameter)

    def named(self, module: str, param: str) -> list[str]:
        """The base tensors that may hold `module`'s `param`: the name with and without a base-model prefix, else
        the names the model's transformers convention gives it (an ambiguous one: all of them)."""
        candidates = tensor_candidates(module, param)
        found = [c for c in candidates if c in self.tensors]
        if found or not self.config:
            return found
        for candidate in candidates:  # as named, then without its first component (a diffusers text_encoder.)
            resolution = checkpoint_names(self.config, candidate, self.tensors)
            if resolution.problem is None or len(resolution.names) > 1:
                return [] if resolution.tied_to else list(resolution.names)
        return []

    def unmatched(self, module: LoraModule) -> str:
        """Why no base tensor is found for `module` (which convention, which names were tried)."""
        if module.naming == "kohya":
            return kohya_names.UNMATCHED
        return self.missing(module.module, module.parameter)

    def missing(self, module: str, param: str) -> str:
        """Why no base tensor holds `module`'s `param`."""
        resolution = checkpoint_names(self.config, f"{module}.{param}", self.tensors) if self.config else None
        if resolution is None or resolution.convention == "exact":  # no transformers renaming to try
            return f"target {module}.{param} is not in the base checkpoint"
        if resolution.tied_to:
            return (
                f"target {module}.{param} is stored only as {resolution.names[0]}, which transformers ties it to "
                "(tie_word_embeddings); merging there would change every tensor tied to it, unlike the adapter's "
                "forward, so lorasurgeon refuses it: untie the weights in the base first"
            )
        return f"target {resolution.problem}"

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
