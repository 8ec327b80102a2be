"""Convert a LoRA adapter between PEFT, kohya / sd-scripts and diffusers formats without changing ΔW.

The three formats hold the same factors in the same shapes (A = lora_A = lora_down (r, in, *k), B = lora_B =
lora_up (out, r, *1); shared FORMATS.md §1.4, §5.1, §5.6), so A and B are copied byte for byte. The names change
(lorasurgeon.formats.naming) and the way each format states the scale. PEFT configs (peft, and each diffusers
component's) are written in the single-alpha form (formats.scale_form): one lora_alpha, no alpha_pattern, no
rsLoRA, and B′ = B·sᵢ·rᵢ/α (one rounding) for the modules whose scale that alpha does not give; `patterns` keeps
PEFT's own form (patterns, rsLoRA) instead, and with it every byte of A and B:

- peft: a directory, adapter_config.json + adapter_model.safetensors (§6.4); a PEFT source keeps its config,
  restated in the scale form. Otherwise r and lora_alpha are the most common ones, the others `^<module path>`
  pattern entries (patterns: use_rslora is kept when every module is rsLoRA, else alpha = scale·r).
- kohya: one file of `N.lora_down.weight`, `N.lora_up.weight` and float32 `N.alpha` = scale·r (kohya files have
  no rsLoRA flag, §5.3), with ss_* metadata. A float32 alpha loses nothing unless it changes the float32 scale
  every merge multiplies by; a warning names the modules where it does.
- diffusers: one `pytorch_lora_weights.safetensors`-style file of `<component>.<module path>.lora_A.weight`
  keys with the components' LoraConfigs in its `lora_adapter_metadata`, as diffusers' own save_lora_weights
  writes it; no `.alpha` tensors (diffusers' SD/SDXL loaders reject every key without "lora" in it).

What the target cannot hold (formats.limits.CANNOT) is refused by tensor name before anything is written. An
adapter of another PEFT tuner converts where its ΔW has an exact LoRA form (lorasurgeon.tuner_conversion).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasurgeon import runtime_lowering
from lorasurgeon.adapter import ADAPTER_FORMATS, Adapter, AdapterFormat, LoraModule
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding, LorasurgeonError, MismatchError, Option
from lorasurgeon.formats import limits, load_adapter, writing
from lorasurgeon.formats.kohya import prefix_of
from lorasurgeon.formats.naming import COMPONENTS, Targets, layout_component, target_names
from lorasurgeon.formats.peft import ADAPTER_WEIGHTS
from lorasurgeon.formats.peft_config import ADAPTER_CONFIG
from lorasurgeon.formats.resolution import kohya_names_of
from lorasurgeon.formats.writing import BaseModel, Converted, Lowered
from lorasurgeon.header import TensorInfo
from lorasurgeon.plan import plan_surgery
from lorasurgeon.tuner_conversion import as_lora
from lorasurgeon.writer import CheckpointWriter

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion wrote (or, with dry_run, would write)."""

    adapter: str
    source: Adapter = field(repr=False)  # the source in normal form (its tensors closed)
    target_format: AdapterFormat
    output: str
    dry_run: bool
    modules: tuple[Converted, ...]
    carried: tuple[str, ...]  # replacement and trainable-token tensors, copied as they are (PEFT to PEFT)
    folded: tuple[str, ...]  # the modules whose B is B·sᵢ·rᵢ/α in OUT (the single-alpha form)
    left_out: tuple[str, ...]  # tensors not converted: other components, keys the PEFT config does not select
    warnings: tuple[Finding, ...]
    config: dict[str, Any] | None  # adapter_config.json (peft) or the unpacked lora_adapter_metadata (diffusers)
    metadata: dict[str, str]
    bytes_written: int
    seconds: float
    runtime: str | None = None  # convert --for: the runtime it was lowered for
    rank: int | None = None  # the one rank every module was padded to
    added: tuple[str, ...] = ()  # modules the lowering wrote that the source lacks (token rows, zero modules)


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert to: the format `to`, BASE to resolve names against, the pipeline `component`, an `alpha`
    for files without one, `base_name`, the base_model_name_or_path a PEFT output records (default: BASE),
    `patterns` for PEFT's own scale form (formats.scale_form), and the serving `runtime` to lower it for, with that
    server's options (`server`, runtimes.OPTIONS); `to` defaults to what it reads."""

    to: str | None = None
    base: Path | None = None
    component: str | None = None
    alpha: float | None = None
    base_name: str | None = None
    patterns: bool = False
    runtime: str | None = None
    server: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> AdapterFormat:
        to = self.to
        if self.runtime is not None:
            if self.patterns:
                raise LorasurgeonError(
                    Option("patterns", flag=True), " and ", Option("runtime", self.runtime, cli="for"),
                    " are exclusive: a runtime is given the single-alpha form",
                )  # fmt: skip
            to = runtime_lowering.target_format(self.runtime, to)
        elif self.server:
            raise LorasurgeonError(f"server options ({', '.join(self.server)}) need ", Option("runtime", cli="for"))
        if to not in ADAPTER_FORMATS:
            raise LorasurgeonError(Option("to", to), f": expected one of {', '.join(ADAPTER_FORMATS)}")
        if self.component is not None and self.component not in COMPONENTS:
            raise LorasurgeonError(Option("component", self.component), f": expected one of {', '.join(COMPONENTS)}")
        return next(f for f in ADAPTER_FORMATS if f == to)


@dataclass(frozen=True)
class _Output:
    """Everything OUT holds, decided before anything is written."""

    modules: list[Converted]
    entries: list[tuple[str, writing.Entry | torch.Tensor]]
    config: dict[str, Any] | None
    metadata: dict[str, str]
    left_out: list[tuple[str, list[str]]]
    retarget: runtime_lowering.Retarget | None


def run(adapter_path: Path, out: Path | None, options: ConvertOptions, *, force: bool, dry_run: bool) -> ConvertSummary:
    """Load, select, refuse, name, lower, then write atomically; for lorasurgeon.convert(). Nothing is written
    unless every module converts."""
    started = time.perf_counter()
    to, base = options.validate(), options.base
    adapter = load_adapter(adapter_path, options.alpha)
    scratch = contextlib.ExitStack()
    try:
        if adapter.tuner_modules:  # a PEFT tuner other than LoRA: its exact LoRA form, where it has one
            adapter = as_lora(adapter, base, scratch)
        output = _prepare(adapter, options, to)
        target = _output(adapter, out, to)
        written = 0
        if not dry_run:
            inputs = [adapter_path, *([base] if base is not None else [])]
            with CheckpointWriter(target, is_dir=to == "peft", inputs=inputs, force=force) as writer:
                _write(writer, adapter, output.entries, output.metadata)
                if to == "peft" and output.config is not None:
                    writer.write_json(ADAPTER_CONFIG, output.config)
            written = writer.bytes_written
    finally:
        adapter.source.close()
        scratch.close()
    retarget = output.retarget
    carried = [r.tensor.name for r in adapter.replacements]
    carried += [t.tensor.name for t in adapter.token_rows] if retarget is None or not retarget.tokens_lowered else []
    return ConvertSummary(
        adapter=str(adapter_path),
        source=adapter,
        target_format=to,
        output=str(target),
        dry_run=dry_run,
        modules=tuple(output.modules),
        carried=tuple(carried),
        folded=tuple(c.module.module for c in output.modules if c.factor != 1.0),
        left_out=tuple(name for _, names in output.left_out for name in names),
        warnings=tuple(_left_out_warnings(output.left_out) + writing.alpha_warnings(output.modules, to)),
        config=output.config,
        metadata=output.metadata,
        bytes_written=written,
        seconds=time.perf_counter() - started,
        runtime=options.runtime,
        rank=retarget.rank if retarget else None,
        added=tuple(a.path for a in retarget.added) if retarget else (),
    )


def _prepare(adapter: Adapter, options: ConvertOptions, to: AdapterFormat) -> _Output:
    """Every module's name, rank, alpha and fold in OUT, its config and metadata, and the tensors to write."""
    base = options.base
    modules, left_out = _select(adapter, options.component)
    found, described = (
        (None, BaseModel(options.base_name, True)) if base is None else _targets(adapter, modules, base, options)
    )
    early = limits.refusal(adapter, modules, to, tokens=False)  # before naming: that may ask for a component
    if early is not None:
        raise early
    names = target_names(adapter, modules, to, options.component or (found.component if found else None), found)
    retarget = None
    if options.runtime is not None:
        retarget = runtime_lowering.prepare(adapter, modules, names, base, options.runtime, options.server)
    tokens = retarget is None or not retarget.tokens_lowered
    refused = limits.refusal(adapter, modules, to, tokens=tokens)
    if refused is not None:
        raise refused
    members = [(n, m.rank, m.alpha, m.scale) for n, m in zip(names, modules, strict=True)]
    members += [(a.path, a.rank, float(a.rank), a.scale) for a in retarget.added] if retarget else []
    forms = writing.scale_forms(members, to, patterns=options.patterns, rank=retarget.rank if retarget else None)
    converted = writing.converted(modules, names, to, forms)
    config = writing.config(adapter, converted, to, forms, described)
    entries: list[tuple[str, writing.Entry | torch.Tensor]] = [*writing.entries(adapter, converted, to, tokens=tokens)]
    if retarget is not None:
        if to == "peft" and adapter.config and config is not None:
            config = runtime_lowering.amended(config, retarget)
        runtime_lowering.verify(retarget, converted, config, to)
        entries += runtime_lowering.added_tensors(retarget, forms[""].factors[len(modules) :] if retarget.added else ())
    metadata = writing.metadata(adapter, converted, to, config, base.name if base else None)
    return _Output(converted, entries, config, metadata, left_out, retarget)


def _select(adapter: Adapter, component: str | None) -> tuple[list[LoraModule], list[tuple[str, list[str]]]]:
    """The modules to convert (of kohya and diffusers files, those of `component` when given), and what is left
    out, as (why, tensor names). A PEFT adapter is for one model: `component` names it, selecting nothing."""
    left_out = [("its module is not selected by adapter_config.json, so PEFT ignores it", list(adapter.ignored))]
    grouped = any(m.component or m.naming == "kohya" for m in adapter.modules)
    if component is None or not grouped:
        return list(adapter.modules), left_out
    wanted = COMPONENTS[component]
    modules = [m for m in adapter.modules if m.component == wanted]
    if not modules:
        present = sorted({m.component or prefix_of(m.module) for m in adapter.modules})
        raise LorasurgeonError(
            f"{adapter.path}: ",
            Option("component", component),
            f" selects no module; the adapter has {', '.join(present)}",
        )
    chosen = {m.module for m in modules}
    others = [t.name for m in adapter.modules if m.module not in chosen for t in m.tensors]
    return modules, [*left_out, (f"it is not of component {component}", others)]


def _targets(
    adapter: Adapter, modules: list[LoraModule], base_path: Path, options: ConvertOptions
) -> tuple[Targets, BaseModel]:
    """Every module's tensor in BASE, found as a merge finds it (MismatchError when one does not resolve or fit),
    the component BASE's layout says it is, and what a PEFT output says of BASE."""
    selected = dataclasses.replace(adapter, modules=tuple(modules), unselected=())
    with Checkpoint.open(base_path) as base:
        plan = plan_surgery("merge", base, [selected], [1.0], allow_nonfinite=True)  # NaNs are copied, not merged
        kohya = kohya_names_of(list(base.tensors))
        component = layout_component(base.root, base.config)
        name = options.base_name or str(base_path)
        described = BaseModel.of(name, options.base_name is not None, base.config)
    if plan.errors:
        more = f" (and {len(plan.errors) - 1} more problems)" if len(plan.errors) > 1 else ""
        raise MismatchError(*plan.errors[0].parts, f" (BASE {base_path}){more}")
    targets = {t.module.module: s.tensor.name for s in plan.steps for t in s.terms if not t.bias}
    missing = [m for m in modules if m.module not in targets]
    if missing:
        more = f" (and {len(missing) - 1} more modules)" if len(missing) > 1 else ""
        raise MismatchError(
            f"{missing[0].a.name}: BASE {base_path} holds no tensor for it{more}; pass ",
            Option("component"),
            " to convert only the modules of one component",
        )
    return Targets(targets, kohya, component), described


def _write(
    writer: CheckpointWriter,
    adapter: Adapter,
    tensors: list[tuple[str, writing.Entry | torch.Tensor]],
    metadata: dict[str, str],
) -> None:
    """OUT's one file: source tensors copied byte for byte, rewritten factors read, lowered and written one at a
    time, kohya's alphas as float32 scalars."""
    import torch  # kohya's alphas become float32 scalar tensors

    from lorasurgeon import lowering
    from lorasurgeon.header import dtype_name

    entries = []
    for key, value in tensors:
        if isinstance(value, TensorInfo):
            entries.append((key, value.dtype, value.shape))
        elif isinstance(value, Lowered):
            entries.append((key, value.tensor.dtype, value.shape))
        elif isinstance(value, torch.Tensor):
            entries.append((key, dtype_name(value.dtype), tuple(value.shape)))
        else:
            entries.append((key, dtype_name(torch.float32), ()))
    with writer.shard(ADAPTER_WEIGHTS, entries, metadata) as stream:
        for _, value in tensors:
            if isinstance(value, TensorInfo):
                stream.copy_from(adapter.source, value)
            elif isinstance(value, Lowered):
                stream.write(lowering.lowered(adapter.source.read(value.tensor), value.role, value.rank, value.factor))
            else:
                stream.write(value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32))


def _output(adapter: Adapter, out: Path | None, to: AdapterFormat) -> Path:
    """OUT, or `<adapter name>-<format>` in the current directory: a directory for peft, a file otherwise."""
    if out is None:
        stem = adapter.path.name.removesuffix(".safetensors")
        return Path(f"{stem}-{to}" if to == "peft" else f"{stem}-{to}.safetensors")
    if (to == "peft") == (out.suffix == ".safetensors"):
        shape = "an adapter directory" if to == "peft" else "one .safetensors file"
        raise LorasurgeonError(f"{out}: ", Option("to", to), f" writes {shape}; name OUT accordingly")
    return out


def _left_out_warnings(left_out: list[tuple[str, list[str]]]) -> list[Finding]:
    return [
        Finding.of(
            "warning", f"{names[0]}: left out, {why}" + (f" ({len(names)} tensors in all)" if len(names) > 1 else "")
        )
        for why, names in left_out
        if names
    ]
