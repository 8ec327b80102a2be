"""How an adapter is written in each format: tensor keys, adapter_config.json or lora_adapter_metadata, kohya
`.alpha` and ss_* metadata (shared FORMATS.md §1.4, §5.1, §5.4, §5.6, §6.4); what a format cannot hold is
formats.limits'.

The three formats hold the same factors in the same shapes (A = lora_A = lora_down (r, in, *k), B = lora_B =
lora_up (out, r, *1)), so A and B are copied byte for byte where the target states each module's scale as it was:
kohya's per-module `.alpha`, and PEFT configs in the patterns form. PEFT configs (adapter_config.json, a diffusers
component's LoraConfig) are written in the single-alpha form by default (formats.scale_form): one lora_alpha, and
B′ = B·cᵢ for the modules whose scale it does not give (`Lowered`, rewritten on the way out); `convert --for` may
also pad every module to one rank.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lorasurgeon.adapter import Adapter, AdapterFormat, LoraModule
from lorasurgeon.errors import Finding, UnsupportedError
from lorasurgeon.formats import diffusers, kohya
from lorasurgeon.formats.model_classes import auto_mapping, task_type
from lorasurgeon.formats.peft import PEFT_PREFIX
from lorasurgeon.formats.peft_config_writer import adapter_config
from lorasurgeon.formats.peft_parameters import nesting
from lorasurgeon.formats.scale_form import ScaleForm, restated, scale_form
from lorasurgeon.header import TensorInfo

FACTOR_KEYS = {
    "kohya": ("lora_down.weight", "lora_up.weight"),
    "linear": ("lora_A.weight", "lora_B.weight"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
}


@dataclass(frozen=True)
class Converted:
    """One module of the output: the source module, its name in OUT, the rank and alpha OUT states for it (the
    config's after patterns, or kohya's float32 `.alpha`), and `factor`, the cᵢ its B is multiplied by (1: bit for
    bit); its scale is the source module's."""

    module: LoraModule
    name: str
    alpha: float
    rank: int
    factor: float = 1.0

    @property
    def rewritten(self) -> bool:
        """Whether OUT's factors differ from the source's bytes (folded or padded)."""
        return self.factor != 1.0 or self.rank != self.module.rank


@dataclass(frozen=True)
class Lowered:
    """A source tensor rewritten on its way out: A's rows or B's columns padded with zeros to `rank`, and B (and its
    lora_B bias) multiplied by `factor`, rounded once to its dtype (lowering.py)."""

    tensor: TensorInfo
    role: Literal["a", "b", "bias"]
    rank: int
    factor: float

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.tensor.shape
        if self.role == "a":
            return (self.rank, *shape[1:])  # (r′, in, *k)
        return (shape[0], self.rank, *shape[2:]) if self.role == "b" else shape  # (out, r′, *1)


Member = tuple[str, int, float, float]  # (name in OUT, rank, alpha, scale) of a module a config states


def scale_forms(
    members: Sequence[Member], to: AdapterFormat, *, patterns: bool, rank: int | None = None
) -> dict[str, ScaleForm]:
    """The scale form (formats.scale_form) of each config OUT holds, by group: "" for peft, the component for
    diffusers, none for kohya (its per-module `.alpha` states every scale as it is). `rank` pads every module."""
    if to == "kohya":
        return {}
    groups: dict[str, list[Member]] = {}
    for member in members:
        groups.setdefault(_group(member[0], to), []).append(member)
    return {
        key: scale_form(
            [_path(n, to) for n, *_ in group], [(r, a, s) for _, r, a, s in group], patterns=patterns, rank=rank
        )
        for key, group in groups.items()
    }


def converted(
    modules: Sequence[LoraModule], names: Sequence[str], to: AdapterFormat, forms: dict[str, ScaleForm]
) -> list[Converted]:
    """Each module with its name in OUT and the rank, alpha and fold its format states for it: kohya's float32
    scale·r, or what the scale form of its config gives it."""
    if to == "kohya":
        return [Converted(m, n, kohya.alpha_of(m), m.rank) for n, m in zip(names, modules, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for name, m in zip(names, modules, strict=True):
        group = _group(name, to)
        index = seen[group] = seen.get(group, -1) + 1
        form = forms[group]
        state = form.modules[index]
        out.append(Converted(m, name, state.alpha, state.rank, form.factors[index]))
    return out


def _group(name: str, to: AdapterFormat) -> str:
    """The config a module's name puts it under: one for peft, its component's for diffusers."""
    return name.partition(".")[0] if to == "diffusers" else ""


def _path(name: str, to: AdapterFormat) -> str:
    """The module path its config names it by (a diffusers name without its component)."""
    return name.partition(".")[2] if to == "diffusers" else name


@dataclass(frozen=True)
class BaseModel:
    """What adapter_config.json says of the base, so that AutoPeftModel can build it: its name (`given`: by the user,
    so it replaces a source's own), the task type of its architecture, or without one PEFT's auto_mapping."""

    name: str | None = None
    given: bool = False
    task_type: str | None = None
    auto_mapping: dict[str, str] | None = None

    @classmethod
    def of(cls, name: str | None, given: bool, config: Mapping[str, Any] | None) -> BaseModel:
        task = task_type(config) if config else None
        return cls(name, given, task, auto_mapping(config) if config and task is None else None)

    def described(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` with what this says filled in where the config says nothing (the name also where given)."""
        out = dict(config)
        if self.name is not None and (out.get("base_model_name_or_path") is None or self.given):
            out["base_model_name_or_path"] = self.name
        if out.get("task_type") is None and self.task_type is not None:
            out["task_type"] = self.task_type
        if out.get("task_type") is None and out.get("auto_mapping") is None and self.auto_mapping is not None:
            out["auto_mapping"] = self.auto_mapping
        return out


def config(
    adapter: Adapter,
    modules: list[Converted],
    to: AdapterFormat,
    forms: dict[str, ScaleForm],
    base: BaseModel = BaseModel(),
) -> dict[str, Any] | None:
    """adapter_config.json (a PEFT source's own, restated in its scale form), naming `base`, or the diffusers
    metadata, unpacked."""
    if to == "kohya":
        return None
    if to == "peft" and adapter.config:  # a tuner that only sets tensors has no LoRA module to state a scale for
        return base.described(restated(adapter.config, forms[""]) if "" in forms else dict(adapter.config))
    configs = {}
    for component, form in forms.items():
        configs[component] = peft_config_for([c.module for c in modules if _group(c.name, to) == component], form)
    return base.described(configs[""]) if to == "peft" else diffusers.packed(configs)


def peft_config_for(modules: list[LoraModule], form: ScaleForm) -> dict[str, Any]:
    """adapter_config.json that targets the modules of `form` and gives each its rank and scale by `form`."""
    return adapter_config(
        form.modules,
        target_modules=sorted(m.path for m in form.modules),
        use_rslora=form.use_rslora,
        use_dora=any(m.magnitude is not None for m in modules),
        lora_bias=any(m.bias is not None for m in modules),
    )


def metadata(
    adapter: Adapter, modules: list[Converted], to: AdapterFormat, config: dict[str, Any] | None, base: str | None
) -> dict[str, str]:
    """safetensors metadata: {"format": "pt"}, our record, and the target's own (kohya ss_*, diffusers config)."""
    record = {"operation": "convert", "adapter": adapter.path.name, "from": adapter.format, "to": to, "base": base}
    out = {"format": "pt", "lorasurgeon": json.dumps(record)}
    if to == "diffusers" and config is not None:
        out[diffusers.METADATA] = diffusers.metadata(config)
    if to != "kohya":
        return out
    source = adapter.source.shards[0].header.metadata
    return kohya.metadata([c.module for c in modules], [c.alpha for c in modules], source) | out


Entry = TensorInfo | float | Lowered


def entries(
    adapter: Adapter, modules: list[Converted], to: AdapterFormat, *, tokens: bool = True
) -> list[tuple[str, Entry]]:
    """The output's tensors in order: source tensors copied byte for byte, the factors a fold or a padding rewrites
    (`Lowered`), and kohya's float32 alphas (numbers); trainable-token rows as they are only when `tokens`."""
    out: list[tuple[str, Entry]] = []
    depths = nesting([c.module for c in modules])
    for c in modules:
        m = c.module
        prefix = (
            PEFT_PREFIX + c.name + ".base_layer" * depths.get((m.module, m.parameter), 0) if to == "peft" else c.name
        )
        a_key, b_key = FACTOR_KEYS["kohya" if to == "kohya" else "embedding" if m.kind == "embedding" else "linear"]
        padded = c.rank != m.rank
        if padded and m.kind == "experts":  # zeros after all E experts' rows would shift every expert's slice
            raise UnsupportedError(f"{m.module}.{m.parameter}: cannot pad an experts module's rank (r per expert)")
        stored = c.rank * (m.experts if m.kind == "experts" else 1)  # an experts factor holds r rows per expert
        a: Entry = Lowered(m.a, "a", stored, 1.0) if padded else m.a
        b: Entry = Lowered(m.b, "b", stored, c.factor) if c.rewritten else m.b
        out += [(f"{prefix}.{a_key}", a), (f"{prefix}.{b_key}", b)]
        if to == "kohya":
            out.append((f"{prefix}.alpha", c.alpha))
        if m.magnitude is not None:
            out.append((f"{prefix}.lora_magnitude_vector", m.magnitude))
        if m.bias is not None:  # PEFT scales lora_B's bias with lora_B: it is folded too
            bias: Entry = Lowered(m.bias, "bias", c.rank, c.factor) if c.factor != 1.0 else m.bias
            out.append((f"{prefix}.lora_B.bias", bias))
    for info in [r.tensor for r in adapter.replacements] + [t.tensor for t in adapter.token_rows if tokens]:
        out.append((PEFT_PREFIX + info.name.removeprefix(PEFT_PREFIX), info))
    return out


def alpha_warnings(modules: list[Converted], to: AdapterFormat) -> list[Finding]:
    """kohya modules whose float32 `.alpha` changes the float32 scale every merge multiplies by."""
    drifts = [(c, kohya.float32_drift(c.module, c.alpha)) for c in modules] if to == "kohya" else []
    changed = [(c, drift) for c, drift in drifts if drift is not None]
    if not changed:
        return []
    first, drift = changed[0]
    message = (
        f"{first.name}.alpha: scale·r = {first.module.scale * first.module.rank!r} is not a float32 number; the "
        f"float32 alpha {first.alpha!r} changes the scale by {drift:.1e} relative ({len(changed)} modules in all)"
    )
    return [Finding.of("warning", message)]
