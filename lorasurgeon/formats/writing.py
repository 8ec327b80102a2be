"""What each adapter format can hold, and how an adapter is written in it: tensor keys, adapter_config.json or
lora_adapter_metadata, kohya `.alpha` and ss_* metadata (shared FORMATS.md §1.4, §5.1, §5.4, §5.6, §6.4).

The three formats hold the same factors in the same shapes (A = lora_A = lora_down (r, in, *k), B = lora_B =
lora_up (out, r, *1)), so A and B are copied byte for byte and each format's own way of stating the scale gives
every module exactly the scale it had; nothing is folded into B.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorasurgeon.adapter import ADAPTER_FORMATS, Adapter, AdapterFormat, LoraModule
from lorasurgeon.errors import Finding, UnsupportedError
from lorasurgeon.formats import diffusers, kohya
from lorasurgeon.formats.model_classes import auto_mapping, task_type
from lorasurgeon.formats.peft import PEFT_PREFIX
from lorasurgeon.formats.peft_config import adapter_config, written
from lorasurgeon.header import TensorInfo

FACTOR_KEYS = {
    "kohya": ("lora_down.weight", "lora_up.weight"),
    "linear": ("lora_A.weight", "lora_B.weight"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
}
ONLY_FACTORS = "{} files hold LoRA factors only"
NO_LORA_KEY = "diffusers' loaders reject every key without 'lora' in it ('Invalid LoRA checkpoint')"
# What a target cannot hold: (target, what the tensor is) -> why.
CANNOT: dict[tuple[str, str], str] = {
    ("kohya", "dora"): "is a DoRA magnitude; kohya files keep DoRA as dora_scale in LyCORIS' convention (per "
    "output or per input, normed with an epsilon), which is not PEFT's",
    ("kohya", "bias"): "is a lora_B bias (lora_bias); kohya files have no LoRA bias",
    ("kohya", "embedding"): "is an embedding LoRA, whose ΔW is (B·A)ᵀ; kohya files have no embedding LoRA, "
    "and their readers would add lora_up @ lora_down untransposed",
    ("diffusers", "embedding"): "is an embedding LoRA; diffusers pipeline components adapt no embeddings, and "
    "lorasurgeon does not write them to diffusers files",
    ("kohya", "conv1d"): "is a transformers Conv1D LoRA (fan_in_fan_out: the weight is stored (in, out)); kohya "
    "files have no transpose flag, so their readers would add ΔW transposed",
    ("diffusers", "conv1d"): "is a transformers Conv1D LoRA (fan_in_fan_out: the weight is stored (in, out)); "
    "diffusers files are for pipeline components, which have no Conv1D layers",
    ("kohya", "replacement"): "replaces a base tensor in full (modules_to_save, a saved embedding or bias); "
    + ONLY_FACTORS.format("kohya"),
    ("diffusers", "replacement"): f"replaces a base tensor in full (modules_to_save, a saved embedding or "
    f"bias); {NO_LORA_KEY}",
    ("peft", "replacement"): "replaces a base tensor in full, and without the source's adapter_config.json "
    "nothing says which modules_to_save entry or saved embedding it is, so PEFT would ignore it",
    ("kohya", "tokens"): f"holds trainable token rows; {ONLY_FACTORS.format('kohya')}",
    **{
        (target, "lycoris"): "is a LyCORIS LoHa / LoKr / Tucker LoCon factor, whose ΔW is no product B·A: convert "
        "writes LoRA factors only (merge it instead)"
        for target in ADAPTER_FORMATS
    },
    **{
        (target, "dora_scale"): "is a kohya / LyCORIS dora_scale, which convert does not carry: its convention "
        "(per output or per input, normed with an epsilon) is not PEFT's lora_magnitude_vector"
        for target in ADAPTER_FORMATS
    },
    ("diffusers", "tokens"): f"holds trainable token rows; {NO_LORA_KEY}",
}


@dataclass(frozen=True)
class Converted:
    """One module of the output: the source module, its name in OUT, and the alpha OUT gives it (the config's
    after patterns, or kohya's float32 `.alpha`); its scale is the source module's."""

    module: LoraModule
    name: str
    alpha: float


def refusal(adapter: Adapter, modules: Sequence[LoraModule], to: AdapterFormat) -> UnsupportedError | None:
    """The error naming the first tensor the `to` format cannot hold, and why."""
    problems = [(r.tensor.name, "replacement") for r in adapter.replacements]
    if to == "peft":  # PEFT holds them all, given the source's config to say what the full tensors are
        problems = problems if not adapter.config else []
    else:
        problems += [(t.tensor.name, "tokens") for t in adapter.token_rows]
    problems = [problem for m in modules for problem in _unheld(m, to)] + problems
    if not problems:
        return None
    name, what = problems[0]
    more = f" (and {len(problems) - 1} more tensors {to} cannot hold)" if len(problems) > 1 else ""
    return UnsupportedError(f"{adapter.path}: {name} {CANNOT[to, what]}; nothing was converted{more}")


def _unheld(m: LoraModule, to: AdapterFormat) -> list[tuple[str, str]]:
    """(tensor, what it is) for the parts of one module the target cannot hold."""
    if m.factors:
        return [(m.a.name, "lycoris")]
    if m.dora == "lycoris" and m.magnitude is not None:
        return [(m.magnitude.name, "dora_scale")]
    if to == "peft":
        return []
    parts = [(m.a.name, "conv1d")] if m.fan_in_fan_out else []
    parts += [(m.a.name, "embedding")] if m.kind == "embedding" else []
    if to == "kohya":
        parts += [(m.magnitude.name, "dora")] if m.magnitude is not None else []
        parts += [(m.bias.name, "bias")] if m.bias is not None else []
    return parts


def converted(modules: Sequence[LoraModule], names: Sequence[str], to: AdapterFormat) -> list[Converted]:
    """Each module with its name in OUT and the alpha its format states for it: kohya's float32 scale·r, or the
    alphas each PEFT config (one per diffusers component) gives its modules."""
    if to == "kohya":
        return [Converted(m, n, kohya.alpha_of(m)) for n, m in zip(names, modules, strict=True)]
    out = [Converted(m, n, m.alpha) for n, m in zip(names, modules, strict=True)]
    alphas: dict[str, float] = {}
    for group in _groups(out, to).values():
        _, states = written([c.name for c in group], [(c.module.rank, c.module.alpha, c.module.scale) for c in group])
        alphas.update((c.name, s.alpha) for c, s in zip(group, states, strict=True))
    return [Converted(c.module, c.name, alphas[c.name]) for c in out]


def _groups(modules: list[Converted], to: AdapterFormat) -> dict[str, list[Converted]]:
    """The modules that share one config: all of them (peft), or those of each component (diffusers)."""
    if to == "peft":
        return {"": modules}
    groups: dict[str, list[Converted]] = {}
    for c in modules:
        groups.setdefault(c.name.partition(".")[0], []).append(c)
    return groups


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
    adapter: Adapter, modules: list[Converted], to: AdapterFormat, alpha: float | None, base: BaseModel = BaseModel()
) -> dict[str, Any] | None:
    """adapter_config.json (a PEFT source's own, with `alpha` applied), naming `base`, or the diffusers metadata,
    unpacked."""
    if to == "kohya":
        return None
    if to == "peft" and adapter.config:
        own = dict(adapter.config)
        if alpha is not None:
            patterns = {k: alpha for k in adapter.config.get("alpha_pattern") or {}}
            own |= {"lora_alpha": alpha, "alpha_pattern": patterns}
        return base.described(own)
    configs = {}
    for component, group in _groups(modules, to).items():
        paths = [c.name.partition(".")[2] if to == "diffusers" else c.name for c in group]
        configs[component] = peft_config_for(paths, [c.module for c in group])
    return base.described(configs[""]) if to == "peft" else diffusers.packed(configs)


def peft_config_for(paths: list[str], modules: list[LoraModule]) -> dict[str, Any]:
    """adapter_config.json that targets `paths` and gives each module its rank and scale."""
    use_rslora, states = written(paths, [(m.rank, m.alpha, m.scale) for m in modules])
    return adapter_config(
        states,
        target_modules=sorted(paths),
        use_rslora=use_rslora,
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


def entries(adapter: Adapter, modules: list[Converted], to: AdapterFormat) -> list[tuple[str, TensorInfo | float]]:
    """The output's tensors in order: source tensors copied byte for byte, and kohya's float32 alphas (numbers)."""
    out: list[tuple[str, TensorInfo | float]] = []
    for c in modules:
        m = c.module
        prefix = PEFT_PREFIX + c.name if to == "peft" else c.name
        a_key, b_key = FACTOR_KEYS["kohya" if to == "kohya" else "embedding" if m.kind == "embedding" else "linear"]
        out += [(f"{prefix}.{a_key}", m.a), (f"{prefix}.{b_key}", m.b)]
        if to == "kohya":
            out.append((f"{prefix}.alpha", c.alpha))
        if m.magnitude is not None:
            out.append((f"{prefix}.lora_magnitude_vector", m.magnitude))
        if m.bias is not None:
            out.append((f"{prefix}.lora_B.bias", m.bias))
    for info in [r.tensor for r in adapter.replacements] + [t.tensor for t in adapter.token_rows]:
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
