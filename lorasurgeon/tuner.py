"""The normal form of a PEFT adapter whose tuner is not LoRA: `TunerAdapter` of `TunerModule`s.

A module names its tensors by role (PEFT's own attribute names with the adapter name removed: `ia3_l`,
`oft_R.weight`, `hada_w1_a`, ...) and carries the per-module values PEFT derives from the config (`params`: a
scaling, a block size, whether IA3 scales columns, ...). Tensors stay on disk as TensorInfo until the surgery
reads them; tensors shared by every module (VeRA's `vera_A`/`vera_B`, VB-LoRA's vector bank) sit once in
`TunerAdapter.shared` and are passed to the maths with each module's own.

The maths (`tuner_merge`) is given the base tensors a module `writes` (and must find every one it `needs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lorasurgeon.adapter import Replacement
from lorasurgeon.header import TensorInfo

# How a base layer stores its weight: nn.Linear (out, in); transformers Conv1D (in, out); nn.ConvNd
# (out, in, *k); nn.Embedding (num_embeddings, dim). The files do not say which; the architecture does.
Layer = Literal["linear", "conv1d", "conv", "embedding"]


@dataclass(frozen=True)
class TunerModule:
    """One adapted module of a non-LoRA PEFT tuner.

    `tuner` is the config's peft_type ("IA3", "OFT", ...); `module` the module's path in the model
    (`model.layers.0.mlp.down_proj`); `tensors` its own tensors by role; `params` the plain values its maths
    needs, as PEFT derives them from the config for this module; `writes` the base tensors it replaces
    (parameter names: "weight", "bias"; those the base lacks are skipped) and `needs` those that must exist.
    """

    tuner: str
    module: str
    tensors: Mapping[str, TensorInfo]
    params: Mapping[str, Any] = field(default_factory=dict)
    writes: tuple[str, ...] = ("weight",)
    needs: tuple[str, ...] = ("weight",)

    def target(self, param: str = "weight") -> str:
        """The checkpoint tensor `module`.`param` (before prefix resolution)."""
        return f"{self.module}.{param}"


@dataclass(frozen=True)
class TunerAdapter:
    """A non-LoRA PEFT adapter in normal form.

    `replacements` are full tensors PEFT loads over the base's before merging (modules_to_save, `bias` other
    than "none", saved embeddings): apply them to the base tensors first, then merge. `ignored` lists the
    tensor names of modules the config does not select, which PEFT skips silently.
    """

    tuner: str
    config: Mapping[str, Any]
    modules: tuple[TunerModule, ...]
    shared: Mapping[str, TensorInfo] = field(default_factory=dict)
    replacements: tuple[Replacement, ...] = ()
    ignored: tuple[str, ...] = ()
