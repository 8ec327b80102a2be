"""Convert a LoRA adapter between PEFT, kohya / sd-scripts and diffusers formats without changing ΔW.

The three formats hold the same factors in the same shapes (A = lora_A = lora_down (r, in, *k), B = lora_B =
lora_up (out, r, *1); shared FORMATS.md §1.4, §5.1, §5.6), so A and B are copied byte for byte. Only the names
change (lorasurgeon.renaming) and the way the scale is written (lorasurgeon.scales; never folded into B):

- peft: a directory, adapter_config.json + adapter_model.safetensors (§6.4); a PEFT source keeps its config.
- kohya: one file of `N.lora_down.weight`, `N.lora_up.weight` and float32 `N.alpha`, with ss_* metadata.
- diffusers: one `pytorch_lora_weights.safetensors`-style file of `<component>.<module path>.lora_A.weight`
  keys with the components' LoraConfigs in its `lora_adapter_metadata`.

What the target cannot hold (table CANNOT) is refused by tensor name before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasurgeon import keys
from lorasurgeon.adapter import WEIGHTS_NAME, Adapter, LoraModule, load_adapter
from lorasurgeon.errors import Finding, LorasurgeonError, UnsupportedError
from lorasurgeon.header import TensorInfo, dtype_name
from lorasurgeon.keys import COMPONENTS
from lorasurgeon.lora_config import CONFIG_NAME
from lorasurgeon.renaming import BaseNames, component_of, resolve, target_names
from lorasurgeon.scales import diffusers_config, float32_drift, kohya_alpha, kohya_metadata, lora_config, peft_alphas
from lorasurgeon.writer import CheckpointWriter

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
        for target in keys.ADAPTER_FORMATS
    },
    **{
        (target, "dora_scale"): "is a kohya / LyCORIS dora_scale, which convert does not carry: its convention "
        "(per output or per input, normed with an epsilon) is not PEFT's lora_magnitude_vector"
        for target in keys.ADAPTER_FORMATS
    },
    ("diffusers", "tokens"): f"holds trainable token rows; {NO_LORA_KEY}",
}


@dataclass(frozen=True)
class ConvertedModule:
    """One module of the output: the source module, its name in OUT, and the alpha OUT gives it (the
    config's after patterns, or kohya's float32 `.alpha`); its scale is the source module's."""

    module: LoraModule
    name: str
    alpha: float


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion wrote (or, with dry_run, would write)."""

    adapter: str
    source_format: str
    target_format: str
    output: str
    dry_run: bool
    modules: tuple[ConvertedModule, ...]
    carried: tuple[str, ...]  # replacement and trainable-token tensors, copied as they are (PEFT to PEFT)
    left_out: tuple[str, ...]  # tensors not converted: other components, keys the PEFT config does not select
    warnings: tuple[Finding, ...]
    config: dict[str, Any] | None  # adapter_config.json (peft) or the unpacked lora_adapter_metadata (diffusers)
    metadata: dict[str, str]
    bytes_written: int
    seconds: float


def run(
    adapter_path: Path,
    out: Path | None,
    to: str,
    base: Path | None,
    component: str | None,
    alpha: float | None,
    force: bool,
    dry_run: bool,
) -> ConvertSummary:
    """Load, select, refuse, name, then write atomically; for lorasurgeon.convert(). Nothing is written
    unless every module converts."""
    started = time.perf_counter()
    if to not in keys.ADAPTER_FORMATS:
        raise LorasurgeonError(f"--to {to}: expected one of {', '.join(keys.ADAPTER_FORMATS)}")
    if component is not None and component not in COMPONENTS:
        raise LorasurgeonError(f"--component {component}: expected one of {', '.join(COMPONENTS)}")
    adapter = load_adapter(adapter_path, alpha)
    try:
        modules, left_out = _select(adapter, component)
        _refuse(adapter, modules, to)
        found = resolve(adapter, modules, base) if base is not None else None
        converted = _convert(adapter, modules, to, component, found)
        tensors = _tensors(adapter, converted, to)
        config = _config(adapter, converted, to, alpha)
        metadata = _metadata(adapter, converted, to, config, base)
        target = _output(adapter, out, to)
        written = 0
        if not dry_run:
            inputs = [adapter_path, *([base] if base is not None else [])]
            with CheckpointWriter(target, is_dir=to == "peft", inputs=inputs, force=force) as writer:
                _write(writer, adapter, tensors, metadata, config if to == "peft" else None)
            written = writer.bytes_written
    finally:
        adapter.source.close()
    carried = [r.tensor.name for r in adapter.replacements] + [t.tensor.name for t in adapter.token_rows]
    return ConvertSummary(
        adapter=str(adapter_path),
        source_format=adapter.format,
        target_format=to,
        output=str(target),
        dry_run=dry_run,
        modules=tuple(converted),
        carried=tuple(carried),
        left_out=tuple(name for _, names in left_out for name in names),
        warnings=tuple(_left_out_warnings(left_out) + _alpha_warnings(converted, to)),
        config=config,
        metadata=metadata,
        bytes_written=written,
        seconds=time.perf_counter() - started,
    )


def _select(adapter: Adapter, component: str | None) -> tuple[list[LoraModule], list[tuple[str, list[str]]]]:
    """The modules to convert (of kohya and diffusers files, those of `component` when given), and what is left
    out, as (why, tensor names)."""
    left_out = [("its module is not selected by adapter_config.json, so PEFT ignores it", list(adapter.ignored))]
    if component is None or adapter.format == "peft":
        return list(adapter.modules), left_out
    wanted = COMPONENTS[component]
    modules = [m for m in adapter.modules if component_of(adapter, m) == wanted]
    if not modules:
        present = sorted({component_of(adapter, m) or keys.kohya_component(m.module) for m in adapter.modules})
        raise LorasurgeonError(
            f"{adapter.path}: --component {component} selects no module; the adapter has {', '.join(present)}"
        )
    chosen = {m.module for m in modules}
    others = [t.name for m in adapter.modules if m.module not in chosen for t in _factors(m)]
    return modules, [*left_out, (f"it is not of --component {component}", others)]


def _factors(module: LoraModule) -> list[TensorInfo]:
    return [t for t in (module.a, module.b, module.magnitude, module.bias) if t is not None]


def _refuse(adapter: Adapter, modules: list[LoraModule], to: str) -> None:
    """UnsupportedError naming the first tensor the target format cannot hold, and why."""
    problems = [(r.tensor.name, "replacement") for r in adapter.replacements]
    if to == "peft":  # PEFT holds them all, given the source's config to say what the full tensors are
        problems = problems if not adapter.config else []
    else:
        problems += [(t.tensor.name, "tokens") for t in adapter.token_rows]
    problems = [problem for m in modules for problem in _unheld(adapter, m, to)] + problems
    if problems:
        name, what = problems[0]
        more = f" (and {len(problems) - 1} more tensors {to} cannot hold)" if len(problems) > 1 else ""
        raise UnsupportedError(f"{adapter.path}: {name} {CANNOT[to, what]}; nothing was converted{more}")


def _unheld(adapter: Adapter, m: LoraModule, to: str) -> list[tuple[str, str]]:
    """(tensor, what it is) for the parts of one module the target cannot hold."""
    if m.factors:
        return [(m.a.name, "lycoris")]
    if adapter.format == "kohya" and m.magnitude is not None:  # a kohya module's magnitude is LyCORIS' dora_scale
        return [(m.magnitude.name, "dora_scale")]
    if to == "peft":
        return []
    parts = [(m.a.name, "conv1d")] if m.fan_in_fan_out else []
    parts += [(m.a.name, "embedding")] if m.kind == "embedding" else []
    if to == "kohya":
        parts += [(m.magnitude.name, "dora")] if m.magnitude is not None else []
        parts += [(m.bias.name, "bias")] if m.bias is not None else []
    return parts


def _convert(
    adapter: Adapter, modules: list[LoraModule], to: str, component: str | None, base: BaseNames | None
) -> list[ConvertedModule]:
    """Each module's name in the target format and the alpha written for it."""
    names = target_names(adapter, modules, to, component, base)
    if to == "kohya":
        return [ConvertedModule(m, n, kohya_alpha(m)) for n, m in zip(names, modules, strict=True)]
    converted = [ConvertedModule(m, n, m.alpha) for n, m in zip(names, modules, strict=True)]
    alphas: dict[str, float] = {}
    for group in _configs(converted, to).values():  # the alphas each config gives its modules
        _, values = peft_alphas([c.module for c in group])
        alphas.update(zip((c.name for c in group), values, strict=True))
    return [dataclasses.replace(c, alpha=alphas[c.name]) for c in converted]


def _configs(converted: list[ConvertedModule], to: str) -> dict[str, list[ConvertedModule]]:
    """The modules that share one config: all of them (peft), or those of each component (diffusers)."""
    if to == "peft":
        return {"": converted}
    groups: dict[str, list[ConvertedModule]] = {}
    for c in converted:
        groups.setdefault(c.name.partition(".")[0], []).append(c)
    return groups


def _config(adapter: Adapter, converted: list[ConvertedModule], to: str, alpha: float | None) -> dict[str, Any] | None:
    """adapter_config.json (a PEFT source's own, with --alpha applied) or the diffusers metadata, unpacked."""
    if to == "kohya":
        return None
    if to == "peft" and adapter.format == "peft" and adapter.config:
        if alpha is None:
            return dict(adapter.config)
        patterns = {k: alpha for k in adapter.config.get("alpha_pattern") or {}}
        return {**adapter.config, "lora_alpha": alpha, "alpha_pattern": patterns}
    if to == "peft":
        return lora_config([c.name for c in converted], [c.module for c in converted])
    groups = _configs(converted, to).items()
    return diffusers_config({k: ([c.name.partition(".")[2] for c in g], [c.module for c in g]) for k, g in groups})


def _metadata(
    adapter: Adapter, converted: list[ConvertedModule], to: str, config: dict[str, Any] | None, base: Path | None
) -> dict[str, str]:
    """safetensors metadata: {"format": "pt"}, our record, and the target's own (kohya ss_*, diffusers config)."""
    record = {"operation": "convert", "adapter": adapter.path.name, "from": adapter.format, "to": to}
    metadata = {"format": "pt", "lorasurgeon": json.dumps(record | {"base": base.name if base else None})}
    if to == "diffusers":
        metadata[keys.DIFFUSERS_METADATA] = json.dumps(config, indent=2, sort_keys=True)
    if to != "kohya":
        return metadata
    source = adapter.source.shards[0].header.metadata if adapter.format == "kohya" else {}
    return kohya_metadata([c.module for c in converted], [c.alpha for c in converted], source) | metadata


def _tensors(
    adapter: Adapter, converted: list[ConvertedModule], to: str
) -> list[tuple[str, TensorInfo | torch.Tensor]]:
    """The output's tensors in order: source tensors copied byte for byte, and kohya's float32 alphas."""
    out: list[tuple[str, TensorInfo | torch.Tensor]] = []
    for c in converted:
        m = c.module
        prefix = keys.PEFT_PREFIX + c.name if to == "peft" else c.name
        a_key, b_key = FACTOR_KEYS["kohya" if to == "kohya" else "embedding" if m.kind == "embedding" else "linear"]
        out += [(f"{prefix}.{a_key}", m.a), (f"{prefix}.{b_key}", m.b)]
        if to == "kohya":
            out.append((f"{prefix}.alpha", torch.tensor(c.alpha, dtype=torch.float32)))
        if m.magnitude is not None:
            out.append((f"{prefix}.lora_magnitude_vector", m.magnitude))
        if m.bias is not None:
            out.append((f"{prefix}.lora_B.bias", m.bias))
    for info in [r.tensor for r in adapter.replacements] + [t.tensor for t in adapter.token_rows]:
        out.append((keys.PEFT_PREFIX + info.name.removeprefix(keys.PEFT_PREFIX), info))
    return out


def _write(
    writer: CheckpointWriter,
    adapter: Adapter,
    tensors: list[tuple[str, TensorInfo | torch.Tensor]],
    metadata: dict[str, str],
    config: dict[str, Any] | None,
) -> None:
    entries = [
        (key, t.dtype, t.shape) if isinstance(t, TensorInfo) else (key, dtype_name(t.dtype), tuple(t.shape))
        for key, t in tensors
    ]
    with writer.shard(WEIGHTS_NAME, entries, metadata) as stream:
        for _, tensor in tensors:
            if isinstance(tensor, TensorInfo):
                stream.copy_from(adapter.source, tensor)
            else:
                stream.write(tensor)
    if config is not None:
        writer.write_json(CONFIG_NAME, config)


def _output(adapter: Adapter, out: Path | None, to: str) -> Path:
    """OUT, or `<adapter name>-<format>` in the current directory: a directory for peft, a file otherwise."""
    if out is None:
        stem = adapter.path.name.removesuffix(".safetensors")
        return Path(f"{stem}-{to}" if to == "peft" else f"{stem}-{to}.safetensors")
    if (to == "peft") == (out.suffix == ".safetensors"):
        shape = "an adapter directory" if to == "peft" else "one .safetensors file"
        raise LorasurgeonError(f"{out}: --to {to} writes {shape}; name OUT accordingly")
    return out


def _left_out_warnings(left_out: list[tuple[str, list[str]]]) -> list[Finding]:
    return [
        Finding(
            "warning", f"{names[0]}: left out, {why}" + (f" ({len(names)} tensors in all)" if len(names) > 1 else "")
        )
        for why, names in left_out
        if names
    ]


def _alpha_warnings(converted: list[ConvertedModule], to: str) -> list[Finding]:
    """kohya modules whose float32 `.alpha` changes the float32 scale every merge multiplies by."""
    drifts = [(c, float32_drift(c.module, c.alpha)) for c in converted] if to == "kohya" else []
    changed = [(c, drift) for c, drift in drifts if drift is not None]
    if not changed:
        return []
    first, drift = changed[0]
    return [
        Finding(
            "warning",
            f"{first.name}.alpha: scale·r = {first.module.scale * first.module.rank!r} is not a float32 number; the "
            f"float32 alpha {first.alpha!r} changes the scale by {drift:.1e} relative ({len(changed)} modules in all)",
        )
    ]
