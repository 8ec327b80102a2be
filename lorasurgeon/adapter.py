"""The normal form of an adapter: `Adapter` of `LoraModule`s (and `TunerModule`s), whatever format it was read from.

Everything a format says is resolved when the adapter is loaded (lorasurgeon.formats): each module's rank,
alpha and scale, the convention of its DoRA magnitude, its pipeline component and how its name is resolved
against a base. Code downstream (plan, surgery, report, conversion) reads these fields and never asks where
an adapter came from. Factor tensors stay on disk (`Adapter.source`) until they are needed. A PEFT adapter whose
tuner is not LoRA (IA3, OFT, VeRA, ...) holds `TunerModule`s instead, whose maths is lorasurgeon.tuner_merge's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding
from lorasurgeon.header import TensorInfo

AdapterFormat = Literal["peft", "kohya", "diffusers"]
ADAPTER_FORMATS: tuple[AdapterFormat, ...] = ("peft", "kohya", "diffusers")
Kind = Literal["linear", "conv", "embedding", "loha", "lokr", "locon-tucker"]
DoraStyle = Literal["peft", "lycoris"]
Naming = Literal["path", "kohya"]
# How a base layer stores its weight: nn.Linear (out, in); transformers Conv1D (in, out); nn.ConvNd
# (out, in, *k); nn.Embedding (num_embeddings, dim). A tuner's maths needs to know; the architecture says.
Layer = Literal["linear", "conv1d", "conv", "embedding"]


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its name, its factors on disk, and its effective scale.

    `kind` "linear" (also transformers Conv1D), "conv" (A is (r, in, *k)) or "embedding" (A is (r, V), B is
    (d, r)); "loha", "lokr" and "locon-tucker" are LyCORIS modules (see lycoris.py): `factors` holds their
    tensors by role (hada_w1_a, lokr_w2, ...), and `a` and `b` are both the first of them, which names the module
    in messages. `magnitude` is the DoRA magnitude, applied as PEFT's lora_magnitude_vector or as LyCORIS'
    dora_scale (`dora`); `bias` the lora_B bias. `naming` says what `module` is: a module path in the model
    ("path"; a diffusers file's starts with its `component`), or a kohya name that sd-scripts' forward rule
    resolves against the base's tensor names ("kohya").
    """

    module: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool
    kind: Kind = "linear"
    magnitude: TensorInfo | None = None
    bias: TensorInfo | None = None
    factors: Mapping[str, TensorInfo] = field(default_factory=dict)
    dora: DoraStyle = "peft"
    component: str = ""
    naming: Naming = "path"

    @property
    def target(self) -> str:
        """The checkpoint tensor this module changes (before prefix resolution)."""
        return f"{self.module}.weight"

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        """Every tensor of the module, factors first."""
        factors = tuple(self.factors.values()) or (self.a, self.b)
        return factors + tuple(t for t in (self.magnitude, self.bias) if t is not None)


@dataclass(frozen=True)
class TunerModule:
    """One adapted module of a PEFT tuner other than LoRA.

    `tuner` is the config's peft_type ("IA3", "OFT", ...); `module` the module's path in the model
    (`model.layers.0.mlp.down_proj`); `factors` its own tensors by role (PEFT's attribute names without the adapter
    name: `ia3_l`, `oft_R.weight`, `hada_w1_a`); `params` the plain values its maths needs, as PEFT derives them
    from the config for this module (a scaling, a block size, whether IA3 scales columns); `writes` the base
    parameters it changes ("weight", "bias"; those the base lacks are left alone) and `needs` those that must
    exist. `fan_in_fan_out` is the config's word for a Conv1D weight, used when the base names no architecture.
    """

    tuner: str
    module: str
    factors: Mapping[str, TensorInfo]
    params: Mapping[str, Any] = field(default_factory=dict)
    writes: tuple[str, ...] = ("weight",)
    needs: tuple[str, ...] = ("weight",)
    fan_in_fan_out: bool = False

    def target(self, param: str = "weight") -> str:
        """The checkpoint tensor `module`.`param` (before prefix resolution)."""
        return f"{self.module}.{param}"

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return tuple(self.factors.values())

    @property
    def first(self) -> TensorInfo:
        """The tensor that names the module in messages."""
        return next(iter(self.factors.values()))


class Selector(Protocol):
    """An adapter config's module selection (PEFT's check_target_module_exists)."""

    def selects(self, module: str) -> bool: ...


@dataclass(frozen=True)
class Replacement:
    """A full tensor that replaces the base's `module`.`param` (modules_to_save, saved embedding, bias).

    `saved_base`: PEFT's copy of the base weight under a LoRA (`<module>.base_layer.weight`, which it saves for
    embeddings): the value the LoRA applies to, not a trained one."""

    module: str
    param: str
    tensor: TensorInfo
    saved_base: bool = False


@dataclass(frozen=True)
class TokenRows:
    """Trainable tokens: `tensor` holds the new rows `indices` of `module`'s weight (not a delta)."""

    module: str
    tensor: TensorInfo
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Refused:
    """Tensors the merge refuses, as a lenient load describes them: `kind` says what they are ("unpaired",
    "unknown", a LyCORIS algorithm such as "ia3", a PEFT tuner such as "oft"); `tensors` maps role -> tensor."""

    module: str
    kind: str
    tensors: Mapping[str, TensorInfo]


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in normal form; `source` reads its tensors.

    `modules` are the modules a merge applies; `unselected` those the file holds but the config does not select
    (PEFT ignores them). `saved_modules` are the config's modules_to_save entries; `scalars` the tensors that only
    configure (kohya `.alpha`); `rank_source` names where ranks come from, for messages. `scale_known` is False
    when nothing says the LoRA scale (no config, no alphas, no alpha given). `tied_lora`: the LoRA of weights tied
    to the input embedding is the embedding's (PEFT's ensure_weight_tying). `nonfinite` maps factor tensor names to
    their NaN/Inf counts once the values have been scanned. A lenient load (strict=False) also fills `refused`
    and `problems`: what the merge would refuse, and why.
    """

    path: Path
    format: AdapterFormat
    config: dict[str, Any]
    modules: tuple[LoraModule, ...]
    source: Checkpoint
    use_rslora: bool = False
    replacements: tuple[Replacement, ...] = ()
    token_rows: tuple[TokenRows, ...] = ()
    unselected: tuple[LoraModule, ...] = ()
    saved_modules: tuple[str, ...] = ()
    scalars: tuple[str, ...] = ()
    rank_source: str = "the command line"
    scale_known: bool = True
    tied_lora: bool = False
    nonfinite: Mapping[str, int] = field(default_factory=dict)
    refused: tuple[Refused, ...] = ()
    problems: tuple[Finding, ...] = ()
    tuner: str = ""
    tuner_modules: tuple[TunerModule, ...] = ()
    tuner_unselected: tuple[TunerModule, ...] = ()
    shared: Mapping[str, TensorInfo] = field(default_factory=dict)
    selection: Selector | None = None

    @property
    def ignored(self) -> tuple[str, ...]:
        """The tensor names of modules the config does not select, which PEFT (and so lorasurgeon) ignores."""
        names = [t.name for m in self.unselected for t in m.tensors]
        return tuple(sorted(names + [t.name for m in self.tuner_unselected for t in m.tensors]))

    @property
    def empty(self) -> bool:
        return not (self.modules or self.replacements or self.token_rows or self.tuner_modules)


def repeated(adapters: Sequence[Adapter]) -> list[Finding]:
    """A warning naming each adapter given more than once (the same file): each mention adds its ΔW again."""
    seen: dict[Path, list[Adapter]] = {}
    for adapter in adapters:
        seen.setdefault(adapter.source.path.resolve(), []).append(adapter)
    return [
        Finding.of(
            "warning",
            f"{same[0].path}: given {len(same)} times, so its ΔW is added {len(same)} times, each with its own "
            "weight; give it once (with a weight) unless that is what you mean",
        )
        for same in seen.values()
        if len(same) > 1
    ]
